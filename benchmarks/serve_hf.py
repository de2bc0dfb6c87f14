"""The serving peer: Hugging Face transformers' continuous batching (paged cache, its own
scheduler; `model.init_continuous_batching`) on the 1B Llama-style model (random bf16 weights)
and the same workload and arrival times as benchmarks/serve.py. Run by serve.py in its own
process before jaxlm (torch and JAX would share the GPU's memory otherwise); prints one
`PEER {json}` line per rate. Token times are when the manager's streamed output for that token
reached this thread.
"""
from __future__ import annotations

import argparse
import inspect
import json
import time

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from benchmarks.serve import arrivals, summarise, workload

START = time.perf_counter()


def model_1b(smoke: bool = False):
    """The 1B preset's shape (`smoke`: a tiny one on the CPU, to check this script runs)."""
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4) if smoke else dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16)
    cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False,
                      **size)
    torch.manual_seed(0)
    with torch.device("cpu" if smoke else "cuda"):
        return LlamaForCausalLM(cfg).to(torch.float32 if smoke else torch.bfloat16).eval()


def _accepted(fn, **kw):
    """The keyword arguments `fn` takes (the API moved between transformers releases)."""
    names = inspect.signature(fn).parameters
    return {k: v for k, v in kw.items() if k in names}


def run(model, reqs, arrived) -> dict:
    gen = GenerationConfig(do_sample=False, max_new_tokens=max(o for _, o in reqs),
                           eos_token_id=-1, pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=gen)
    if hasattr(manager, "warmup"):  # CUDA graphs captured before the clock starts
        manager.warmup()
    manager.start()
    _drain(manager, [(ids, 4) for ids, _ in reqs[:8]], "warm")  # first-use costs, untimed
    print(f"manager warm {time.perf_counter() - START:.0f} s", flush=True)
    token_times = {i: [] for i in range(len(reqs))}
    seen = {i: 0 for i in range(len(reqs))}
    t0, nxt, done = time.perf_counter(), 0, 0
    while done < len(reqs):
        now = time.perf_counter() - t0
        while nxt < len(reqs) and arrived[nxt] <= now:
            ids, out = reqs[nxt]
            manager.add_request(**_accepted(manager.add_request, input_ids=ids,
                                            request_id=str(nxt), max_new_tokens=out,
                                            streaming=True))
            nxt += 1
        r = manager.get_result(timeout=0.005)
        if r is None:
            continue
        t = time.perf_counter() - t0
        i = int(r.request_id)
        n = len(r.generated_tokens)
        token_times[i] += [t] * (n - seen[i])
        seen[i] = n
        if r.error:
            raise RuntimeError(f"request {i}: {r.error}")
        if r.is_finished():
            done += 1
    manager.stop(block=True)
    wall = max(t[-1] for t in token_times.values() if t)
    return summarise(arrived, token_times, wall)


def _drain(manager, reqs, tag: str):
    for i, (ids, out) in enumerate(reqs):
        manager.add_request(**_accepted(manager.add_request, input_ids=ids,
                                        request_id=f"{tag}{i}", max_new_tokens=out))
    done = 0
    while done < len(reqs):
        r = manager.get_result(timeout=60)
        if r is None:
            raise RuntimeError("no result within 60 s while warming up")
        done += r.is_finished()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--rates", default="8,inf")
    ap.add_argument("--prompt-lens", default="64,2048")
    ap.add_argument("--output-lens", default="32,512")
    ap.add_argument("--smoke", action="store_true", help="a tiny model on the CPU")
    args = ap.parse_args()
    import transformers
    model = model_1b(args.smoke)
    pair = lambda t: tuple(int(x) for x in t.split(","))  # noqa: E731
    reqs = workload(args.requests, 32000, prompt=pair(args.prompt_lens), output=pair(args.output_lens))
    print(f"model ready {time.perf_counter() - START:.0f} s", flush=True)
    with torch.no_grad():
        for rate in (float(r) for r in args.rates.split(",")):
            row = {"name": f"hf continuous batching {transformers.__version__}", "rate": rate}
            try:
                row.update(run(model, reqs, arrivals(len(reqs), rate)))
            except Exception as e:  # noqa: BLE001 (the peer's failure is reported, not fatal)
                row["error"] = f"{type(e).__name__}: {e}"[:1500]
            print("PEER " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
