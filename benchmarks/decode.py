"""Decode throughput of jaxlm.generate on the 1B preset (random weights, bf16): prompt 128, 256
new tokens, greedy, batch 1 and 16. Prints tokens/s end to end (prefill included, as HF's
generate is timed), the decode step's time, and its memory-bandwidth utilisation: (weight bytes
+ KV bytes the step must read) / step time / measured copy bandwidth. With --peer, Hugging Face
transformers' generate (/work/shared/bench/ref_decode.py carried as .peer/) runs first in the
same call, in its own process, so the two never share the GPU's memory.

    python benchmarks/decode.py [--peer .peer/ref_decode.py]     # on the GPU
    python benchmarks/decode.py --smoke                           # tiny, on CPU: does it run
    python benchmarks/decode.py --config configs/deepseek-1b.yaml --cache-dtype int8 --batches 16
    python benchmarks/decode.py --quantize int8                   # int8 weights (bf16 matmuls)
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def copy_bandwidth(nbytes: int) -> float:
    """Bytes/s of a device copy (read + write), like the peer's torch measurement."""
    import jax
    import jax.numpy as jnp
    x = jnp.zeros((nbytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)
    copy(x).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(10):
        y = copy(x)
    y.block_until_ready()
    return 2 * x.nbytes * 10 / (time.perf_counter() - t0)


def build(config: str, overrides: list[str], cache_dtype: str | None = None,
          quantize: str | None = None):
    import jax
    from flax import nnx
    from jaxlm.config import load_config
    from jaxlm.generate.lm import LM
    from jaxlm.models.registry import build_model
    cfg = load_config(config, ["model.dtype=bfloat16", "model.param_dtype=bfloat16"]
                      + overrides).model
    state = jax.jit(lambda: nnx.to_pure_dict(nnx.state(build_model(cfg, nnx.Rngs(0)))))()
    return LM.of(cfg, state, cache_dtype=cache_dtype, quantize=quantize)


def kv_bytes_per_token(lm) -> int:
    """K and V bytes (and int8 scales) one token adds to the cache, over all layers."""
    import jax
    from jaxlm.generate import cache as kv
    shapes = jax.eval_shape(lambda s: lm.empty_cache(s, 1, 1), lm.state)
    return kv.cache_bytes(shapes)


def measure(lm, batch: int, prompt: int, new: int, bw: float, weight_bytes: int):
    import jax
    import numpy as np
    from jaxlm.generate.engine import Engine, Request
    from jaxlm.generate.sampling import SamplingConfig
    rng = np.random.default_rng(0)
    s = SamplingConfig(temperature=0.0, max_tokens=new)
    requests = [Request(rng.integers(3, lm.cfg.vocab_size, prompt), s) for _ in range(batch)]
    engine = Engine(lm, eos_id=None)  # no stop token: every row makes all `new` tokens
    engine.generate(requests)  # compile prefill and loop
    t0 = time.perf_counter()
    outs = engine.generate(requests)
    total = time.perf_counter() - t0
    assert all(len(o.ids) == new for o in outs)
    d, _ = engine.prefill(requests)
    jax.block_until_ready(d)
    t0 = time.perf_counter()
    jax.block_until_ready(engine._loop(lm.state, d))
    step = (time.perf_counter() - t0) / (new - 1)
    kv_read = kv_bytes_per_token(lm) * batch * (prompt + new / 2)  # the mean cache length
    mbu = (weight_bytes + kv_read) / step / bw
    print(f"RESULT jaxlm generate batch {batch}: {batch * new / total:,.0f} tokens/s, "
          f"{step * 1e3:.2f} ms/step, MBU {mbu * 100:.1f}% (weights {weight_bytes / 1e9:.2f} GB "
          f"+ KV {kv_read / 1e9:.3f} GB per step)", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model and lengths (CPU)")
    p.add_argument("--peer", help="run this HF decode script first (ref_decode.py)")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--config", default="configs/llama-1b.yaml", help="the preset decoded")
    p.add_argument("--cache-dtype", choices=("bfloat16", "int8"), help="default: the model's")
    p.add_argument("--quantize", choices=("int8",), help="int8 weights (jaxlm.generate.quantize)")
    args = p.parse_args(argv)
    if args.peer:
        subprocess.run([sys.executable, args.peer], check=False)
    import jax
    if args.smoke:
        lm = build("configs/tiny.yaml", ["runtime.cpu_devices=0"], args.cache_dtype,
                   args.quantize)
        prompt, new, batches, bw_bytes = 16, 8, (1, 2), 2**24
    else:
        lm = build(args.config, [], args.cache_dtype, args.quantize)
        prompt, new, batches, bw_bytes = 128, 256, tuple(map(int, args.batches.split(","))), 2**31
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(lm.state))
    bw = copy_bandwidth(bw_bytes)
    print(f"{jax.devices()[0].device_kind}: params {weight_bytes / 1e9:.2f} GB "
          f"{args.quantize or 'bf16'}; copy "
          f"bandwidth {bw / 1e12:.2f} TB/s; KV {kv_bytes_per_token(lm) / 1024:.0f} KiB/token",
          flush=True)
    for b in batches:
        measure(lm, b, prompt, new, bw, weight_bytes)


if __name__ == "__main__":
    main()
