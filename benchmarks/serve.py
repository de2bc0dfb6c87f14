"""Serving under load: jaxlm's engine (paged KV, continuous batching, chunked prefill) against
Hugging Face transformers' own continuous batching (benchmarks/serve_hf.py, run first in its own
process) on the same synthetic workload in the same call.

The workload is fixed by its seed: prompt lengths uniform in [64, 2048], output lengths uniform in
[32, 512], random token ids, greedy, no stop token (every request generates exactly its length),
arrivals Poisson at each rate (`inf`: all at once). Per rate: output tokens/s (all output tokens
over the time from the first arrival to the last token), time to first token and inter-token
latency p50/p99 (token times are when the step that made them returned to the host), and for
jaxlm the KV pool's waste (slots held but empty) and use, sampled every 16 steps. Device only:
  PYTHONPATH=. python3 benchmarks/serve.py [--requests 1000] [--rates 8,inf] [--peer]
Writes $OUT/serve.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def workload(n: int, vocab: int, seed: int = 0, prompt=(64, 2048), output=(32, 512)):
    """[(prompt ids, output length)] of n requests."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(prompt[0], prompt[1] + 1, n)
    outs = rng.integers(output[0], output[1] + 1, n)
    return [(rng.integers(3, vocab, p).tolist(), int(o)) for p, o in zip(lens, outs)]


def arrivals(n: int, rate: float, seed: int = 1) -> np.ndarray:
    """Seconds after the start at which each request arrives (Poisson at `rate` per second)."""
    if rate == float("inf"):
        return np.zeros(n)
    return np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, n))


def summarise(arrived, token_times: dict, wall: float) -> dict:
    """tokens/s, TTFT and ITL percentiles from each request's token timestamps (seconds)."""
    total = sum(len(t) for t in token_times.values())
    ttft = [t[0] - arrived[i] for i, t in token_times.items() if t]
    itl = np.concatenate([np.diff(t) for t in token_times.values() if len(t) > 1] or [[0.0]])
    pct = lambda x, q: float(np.percentile(x, q)) if len(x) else None  # noqa: E731
    return {"output_tokens": total, "wall_s": wall, "tokens_per_sec": total / wall,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99)}


def run_jaxlm(engine, reqs, arrived) -> dict:
    token_times = {i: [] for i in range(len(reqs))}
    waste, usage = [], []
    t0, nxt, done, steps = time.perf_counter(), 0, 0, 0
    while done < len(reqs):
        now = time.perf_counter() - t0
        while nxt < len(reqs) and arrived[nxt] <= now:
            ids, out = reqs[nxt]
            engine.add(str(nxt), ids, _greedy(out))
            nxt += 1
        if not engine.has_work:
            time.sleep(max(0.0, arrived[nxt] - now))
            continue
        deltas = engine.step()
        t = time.perf_counter() - t0
        steps += 1
        if steps % 16 == 0:
            s = engine.stats()
            waste.append(s["kv_waste"])
            usage.append(s["pool_usage"])
        for d in deltas:
            token_times[int(d.request_id)] += [t] * len(d.token_ids)
            done += d.finish_reason is not None
    wall = max(t[-1] for t in token_times.values())
    out = summarise(arrived, token_times, wall)
    out.update(kv_waste_mean=float(np.mean(waste)) if waste else None,
               pool_usage_mean=float(np.mean(usage)) if usage else None, steps=steps,
               preempted=engine.counters["preempted"])
    return out


def _greedy(max_tokens: int):
    from jaxlm.generate.sampling import SamplingConfig
    return SamplingConfig(temperature=0.0, max_tokens=max_tokens)


def paged_vs_dense(lm, engine, lengths=(512, 2048), batch=32) -> list[dict]:
    """Decode attention alone, one query per sequence: the paged kernel reading a shuffled
    block table against XLA attention over the same keys laid out densely."""
    import jax
    import jax.numpy as jnp
    from kernels_pallas.paged import paged_attention
    from jaxlm.nn.attend import MaskSpec, _attend_xla
    c = lm.cfg
    H, G, K, P = c.num_heads, c.num_kv_heads, c.d_model // c.num_heads, engine.cfg.page_size
    rows = []
    for L in lengths:
        pages = batch * L // P + 1
        key = jax.random.key(L)
        q = jax.random.normal(key, (batch, H, K), jnp.bfloat16)
        kp = jax.random.normal(jax.random.fold_in(key, 1), (pages, P, G, K), jnp.bfloat16)
        vp = jax.random.normal(jax.random.fold_in(key, 2), (pages, P, G, K), jnp.bfloat16)
        perm = np.random.default_rng(0).permutation(np.arange(1, pages))[:batch * L // P]
        tables = jnp.asarray(perm.reshape(batch, L // P), jnp.int32)
        lens, cu = jnp.full((batch,), L, jnp.int32), jnp.arange(batch + 1, dtype=jnp.int32)
        paged = jax.jit(lambda q, kp, vp: paged_attention(q, kp, vp, tables, lens, cu,
                                                          max_q_len=1))
        kd, vd = kp[tables].reshape(batch, L, G, K), vp[tables].reshape(batch, L, G, K)
        mask = MaskSpec(causal=False)
        dense = jax.jit(lambda q, k, v: _attend_xla(q[:, None], k, v, mask, None, K ** -0.5))
        row = {"kv_len": L, "batch": batch}
        for name, fn, args in (("paged_us", paged, (q, kp, vp)), ("dense_xla_us", dense, (q, kd, vd))):
            fn(*args).block_until_ready()
            t = time.perf_counter()
            for _ in range(20):
                y = fn(*args)
            y.block_until_ready()
            row[name] = (time.perf_counter() - t) / 20 * 1e6
        rows.append(row)
    return rows


def run_peer(args) -> list[dict]:
    """benchmarks/serve_hf.py in its own process; its rows so far if it runs out of time."""
    log = "/tmp/serve_hf.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "benchmarks/serve_hf.py", "--requests",
                                 str(args.requests), "--rates", args.rates, "--prompt-lens",
                                 args.prompt_lens, "--output-lens", args.output_lens],
                                stdout=f, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=args.peer_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    text = open(log).read()
    rows = [json.loads(l[5:]) for l in text.splitlines() if l.startswith("PEER ")]
    if len(rows) < len(args.rates.split(",")):
        rows.append({"name": "hf", "error": f"stopped after {args.peer_timeout} s or failed: "
                     + text[-1500:]})
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


def _pair(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/llama-1b.yaml")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--rates", default="8,inf", help="requests/s, comma-separated; inf: at once")
    ap.add_argument("--peer", action="store_true", help="run benchmarks/serve_hf.py first")
    ap.add_argument("--peer-timeout", type=float, default=300, help="seconds the peer may take")
    ap.add_argument("--max-seqs", type=int, default=128)
    ap.add_argument("--token-budget", type=int, default=512)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--pages", type=int, default=0, help="0: from the GPU's free memory")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--prompt-lens", default="64,2048", help="min,max prompt tokens")
    ap.add_argument("--output-lens", default="32,512", help="min,max output tokens")
    ap.add_argument("--attention-lens", default="512,2048", help="paged vs dense: cache lengths")
    ap.add_argument("--cache-dtype", choices=("bfloat16", "int8"),
                    help="KV pages' dtype (default: the model's)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    lens = dict(prompt=_pair(args.prompt_lens), output=_pair(args.output_lens))
    rates = [float(r) for r in args.rates.split(",")]
    result = {"args": vars(args), "rows": []}
    if args.peer:
        result["rows"] += run_peer(args)
    from benchmarks.decode import build
    from jaxlm.serve.engine import ServeConfig, ServingEngine
    lm = build(args.config, args.overrides, args.cache_dtype)
    engine = ServingEngine(lm, ServeConfig(page_size=args.page_size, pages=args.pages,
                                           max_seqs=args.max_seqs,
                                           token_budget=args.token_budget,
                                           max_model_len=args.max_model_len))
    t = time.perf_counter()
    engine.warmup()
    result["warmup_s"] = time.perf_counter() - t
    result["pages"] = engine.pool.num_blocks
    reqs = workload(args.requests, lm.cfg.vocab_size, **lens)
    for rate in rates:
        row = {"name": "jaxlm", "rate": rate, **run_jaxlm(engine, reqs, arrivals(len(reqs), rate))}
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    result["paged_vs_dense"] = paged_vs_dense(lm, engine, _pair(args.attention_lens))
    print(json.dumps(result["paged_vs_dense"]), flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "serve.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
