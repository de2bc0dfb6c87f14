"""Serving: paged KV cache, continuous batching, an OpenAI-compatible server."""
