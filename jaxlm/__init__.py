"""jaxlm: train transformer language models in JAX; parallelism is configuration.

Entry point: `python -m jaxlm.train --config FILE [key.sub=value ...]`.
"""
__version__ = "0.1.0"
