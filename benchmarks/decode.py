"""Decode throughput of jaxlm.generate on the 1B preset (random weights, bf16): prompt 128, 256
new tokens, greedy, batch 1 and 16. Prints tokens/s end to end (prefill included, as HF's
generate is timed), the decode step's time, and its memory-bandwidth utilisation: (weight bytes
+ KV bytes the step must read) / step time / measured copy bandwidth. With --peer, Hugging Face
transformers' generate (/work/shared/bench/ref_decode.py carried as .peer/) runs first in the
same call, in its own process, so the two never share the GPU's memory.

    python benchmarks/decode.py [--peer .peer/ref_decode.py]     # on the GPU
    python benchmarks/decode.py --smoke                           # tiny, on CPU: does it run
    python benchmarks/decode.py --config configs/deepseek-1b.yaml --cache-dtype int8 --batches 16
    python benchmarks/decode.py --variants int8                   # int8 weights (bf16 matmuls)
    python benchmarks/decode.py --variants bf16,int8 --speculate 4  # both, then speculative
    python benchmarks/decode.py --kv-splits 1,2,4 --batches 1     # flash-decoding splits
    python benchmarks/decode.py --min-rows 1,2 --batches 1        # batch 1 padded to 2 rows
    python benchmarks/decode.py --profile --batches 1     # + where the decode step's time goes
    python benchmarks/decode.py --layouts inputs_first,inputs_last  # LM(inputs_last=True)
    python benchmarks/decode.py --xla-options '[{}, {"xla_gpu_enable_triton_gemm": false}]'

--speculate K: batch 1, K drafts a round, against plain greedy of the same model: prompt lookup
(3-grams) and a draft model. With random weights no small model predicts the target, so the
draft measured is the target's own int8 copy: it shows what a round costs at high acceptance,
not what a trained small draft would give.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import subprocess
import sys
import time
import traceback
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
          quantize: str | None = None, inputs_last: bool | None = None):
    import jax
    from flax import nnx
    from jaxlm.config import load_config
    from jaxlm.generate.lm import LM
    from jaxlm.models.registry import build_model
    cfg = load_config(config, ["model.dtype=bfloat16", "model.param_dtype=bfloat16"]
                      + overrides).model
    state = jax.jit(lambda: nnx.to_pure_dict(nnx.state(build_model(cfg, nnx.Rngs(0)))))()
    return LM.of(cfg, state, cache_dtype=cache_dtype, quantize=quantize,
                 inputs_last=inputs_last)


def kv_bytes_per_token(lm) -> int:
    """K and V bytes (and int8 scales) one token adds to the cache, over all layers."""
    import jax
    from jaxlm.generate import cache as kv
    shapes = jax.eval_shape(lambda s: lm.empty_cache(s, 1, 1), lm.state)
    return kv.cache_bytes(shapes)


def measure(lm, batch: int, prompt: int, new: int, bw: float, weight_bytes: int,
            label: str = "bf16", min_rows: int | None = None, profile: bool = False,
            hlo_out: str | None = None,
            compiler_options: dict | None = None) -> list[list[int]]:
    """Prints the batch's tokens/s, step time and MBU (and with `profile` the step's GPU
    kernels by source line); returns its greedy outputs."""
    import jax
    import numpy as np
    from jaxlm.generate.engine import Engine, Request
    from jaxlm.generate.sampling import SamplingConfig
    rng = np.random.default_rng(0)
    s = SamplingConfig(temperature=0.0, max_tokens=new)
    requests = [Request(rng.integers(3, lm.cfg.vocab_size, prompt), s) for _ in range(batch)]
    # no stop token: every row makes all `new` tokens; MBU counts the real rows' KV only
    engine = Engine(lm, eos_id=None, min_rows=min_rows, compiler_options=compiler_options)
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
    print(f"RESULT jaxlm generate {label} batch {batch}: {batch * new / total:,.0f} tokens/s, "
          f"{step * 1e3:.2f} ms/step, MBU {mbu * 100:.1f}% (weights {weight_bytes / 1e9:.2f} GB "
          f"+ KV {kv_read / 1e9:.3f} GB per step)", flush=True)
    if profile:
        profile_loop(engine, requests, new - 1, f"{label} batch {batch}", hlo_out=hlo_out)
    return [list(o.ids) for o in outs]


def profile_loop(engine, requests, steps: int, label: str, top: int = 25,
                 hlo_out: str | None = None):
    """Traces one decode loop (`steps` steps) and prints GPU time per step by the jaxlm source
    line that produced each kernel (step_profile's HLO metadata), with kernels per step: what a
    step is made of, and which small kernels a fusion would remove. hlo_out: also write the
    loop's optimised HLO there (which ops each fusion holds)."""
    import collections
    import jax
    from benchmarks.step_profile import gpu_kernels, hlo_metadata, source
    d, _ = engine.prefill(requests)
    hlo = engine._loop.lower(engine.lm.state, d).compile().as_text()
    if hlo_out:
        Path(hlo_out).write_text(hlo)
    meta = hlo_metadata(hlo)
    jax.block_until_ready(d)
    us, count = collections.defaultdict(float), collections.Counter()
    for name, ms, info in gpu_kernels(lambda: jax.block_until_ready(
            engine._loop(engine.lm.state, d)), meta):
        key = f"{source(info) if info else '?'}  [{name[:48]}]"
        us[key] += ms * 1e3 / steps
        count[key] += 1
    total = sum(us.values())
    print(f"PROFILE {label}: {total:.0f} us of kernels per step, "
          f"{sum(count.values()) / steps:.0f} kernels per step; top {top}:")
    for key, t in sorted(us.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {t:7.1f} us  {count[key] / steps:5.1f}/step  {key}")


def compare(label: str, batch: int, got: list[list[int]], first: tuple[str, list[list[int]]]):
    """Whether a variant's greedy outputs equal the first variant's of the same weights (a
    kernel that miscompiled on the GPU shows here; in bf16 a near-tie may flip a token too)."""
    base_label, base = first
    differ = [next(i for i, (a, b) in enumerate(zip(g, w)) if a != b)
              for g, w in zip(got, base) if g != w]
    print(f"RESULT outputs {label} batch {batch} vs {base_label}: " + (
        "all equal" if not differ else f"{len(differ)} of {len(got)} rows differ, first at "
        f"token {min(differ)}"), flush=True)


def speculate(lm, K: int, prompt: int, new: int):
    """Batch-1 greedy speculative decoding (prompt lookup, then the int8 copy as the draft)
    against plain greedy: tokens/s end to end and acceptance; outputs must equal plain's."""
    import numpy as np
    from jaxlm.generate.engine import Engine, Request
    from jaxlm.generate.lm import LM
    from jaxlm.generate.sampling import SamplingConfig
    from jaxlm.generate.speculative import Speculator
    ids = np.random.default_rng(1).integers(3, lm.cfg.vocab_size, prompt)
    req = Request(ids, SamplingConfig(temperature=0.0, max_tokens=new))
    engine = Engine(lm, eos_id=None)
    plain = engine.generate([req])[0].ids
    t0 = time.perf_counter()
    engine.generate([req])
    base = new / (time.perf_counter() - t0)
    draft = LM.of(lm.cfg, lm.state, quantize="int8")
    for name, spec in (("prompt lookup (3-grams)", Speculator(lm, K, None, ngram=3)),
                       ("draft = the target's int8 copy", Speculator(lm, K, None, draft))):
        spec.generate(req)  # compile
        t0 = time.perf_counter()
        out = spec.generate(req)
        tps = len(out.ids) / (time.perf_counter() - t0)
        differ = next((i for i, (a, b) in enumerate(zip(out.ids, plain)) if a != b), None)
        same = "equals plain greedy" if differ is None else (
            f"first differs from plain greedy at token {differ} (bf16: the verify pass reads "
            f"{K + 1} positions per matmul, plain decode one, so near-tied logits can flip)")
        print(f"RESULT speculative K={K} {name}: {tps:,.0f} tokens/s vs plain greedy "
              f"{base:,.0f} ({tps / base:.2f}x), acceptance {out.acceptance:.1%}, output "
              f"{same}", flush=True)


def positive_ints(parser, flag: str, value: str) -> list[int]:
    try:
        out = [int(n) for n in value.split(",")]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        parser.error(f"{flag}: {value!r} is not a comma-separated list of positive ints")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model and lengths (CPU)")
    p.add_argument("--peer", help="run this HF decode script first (ref_decode.py)")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--config", default="configs/llama-1b.yaml", help="the preset decoded")
    p.add_argument("--cache-dtype", choices=("bfloat16", "int8"), help="default: the model's")
    p.add_argument("--variants", default="bf16",
                   help="comma-separated weight formats to measure in turn: bf16, int8")
    p.add_argument("--kv-splits", default="auto",
                   help="comma-separated key splits of decode attention (the paged kernel's "
                        "flash-decoding; auto: chosen by the batch) to measure in turn")
    p.add_argument("--min-rows", default="auto",
                   help="comma-separated least rows a batch is padded to (Engine min_rows; "
                        "auto: its default, by the weights' layout), measured in turn")
    p.add_argument("--layouts", default="auto",
                   help="comma-separated matmul weight layouts measured in turn: inputs_first "
                        "(the model's [inputs, outputs]), inputs_last (LM(inputs_last=True)), "
                        "auto (the LM's default: inputs_last on a GPU)")
    p.add_argument("--xla-options", default="[{}]",
                   help="JSON list of XLA option dicts for the decode loop (Engine "
                        "compiler_options), measured in turn, e.g. "
                        "'[{}, {\"xla_gpu_enable_triton_gemm\": false}]'")
    p.add_argument("--profile", action="store_true",
                   help="trace each batch's first setting: GPU time per step by source line")
    p.add_argument("--hlo-out", metavar="PATH",
                   help="with --profile: write the profiled loop's optimised HLO here")
    p.add_argument("--speculate", type=int, default=0, metavar="K",
                   help="also batch-1 speculative decoding with K drafts a round")
    args = p.parse_args(argv)
    if args.peer:
        subprocess.run([sys.executable, args.peer], check=False)
    import jax
    variants = args.variants.split(",")
    if args.smoke:
        config, overrides = "configs/tiny.yaml", ["runtime.cpu_devices=0"]
        prompt, new, batches, bw_bytes = 16, 8, (1, 2), 2**24
    else:
        config, overrides = args.config, []
        prompt, new, batches, bw_bytes = 128, 256, tuple(map(int, args.batches.split(","))), 2**31
    splits = [None if n == "auto" else positive_ints(p, "--kv-splits", n)[0]
              for n in args.kv_splits.split(",")]
    min_rows = [None if n == "auto" else positive_ints(p, "--min-rows", n)[0]
                for n in args.min_rows.split(",")]
    layouts = args.layouts.split(",")
    if not set(layouts) <= {"auto", "inputs_first", "inputs_last"}:
        p.error(f"--layouts: {args.layouts!r}: expected auto, inputs_first or inputs_last")
    try:
        xla_options = json.loads(args.xla_options)
    except ValueError:
        xla_options = None
    if not isinstance(xla_options, list) or not all(isinstance(o, dict) for o in xla_options):
        p.error(f"--xla-options: {args.xla_options!r} is not a JSON list of objects")
    bw = copy_bandwidth(bw_bytes)
    for variant in variants:
        if variant not in ("bf16", "int8"):
            p.error(f"--variants: {variant!r} is not bf16 or int8")
        first = {}  # batch -> (label, outputs) of this weight format's first setting
        profiled = set()  # (layout, batch) traced with --profile: each layout's first setting
        for layout in layouts:
            lm = build(config, overrides, args.cache_dtype, None if variant == "bf16" else variant,
                       inputs_last=None if layout == "auto" else layout == "inputs_last")
            weight_bytes = sum(x.nbytes for x in jax.tree.leaves(lm.state))
            print(f"{jax.devices()[0].device_kind}: params {weight_bytes / 1e9:.2f} GB {variant} "
                  f"{layout}; copy bandwidth {bw / 1e12:.2f} TB/s; KV "
                  f"{kv_bytes_per_token(lm) / 1024:.0f} KiB/token", flush=True)
            for n, rows, xo in itertools.product(splits, min_rows, xla_options):
                lm = dataclasses.replace(lm, kv_splits=n)
                label = " ".join([variant] + [layout] * (len(layouts) > 1)
                                 + [f"kv_splits={n or 'auto'}"] * (len(splits) > 1)
                                 + [f"min_rows={rows}"] * (len(min_rows) > 1)
                                 + [f"xla={json.dumps(xo)}"] * (len(xla_options) > 1))
                for b in batches:
                    hlo_out = args.hlo_out and f"{args.hlo_out}.{variant}.{layout}.b{b}.txt"
                    try:
                        outs = measure(lm, b, prompt, new, bw, weight_bytes, label, rows,
                                       profile=args.profile and (layout, b) not in profiled,
                                       hlo_out=hlo_out, compiler_options=xo or None)
                        profiled.add((layout, b))
                    except Exception as e:  # a lever that fails to compile: say so, go on
                        where = traceback.extract_tb(e.__traceback__)[-1]
                        print(f"RESULT jaxlm generate {label} batch {b}: failed: "
                              f"{type(e).__name__}: {str(e)[:300]} ({where.filename}:"
                              f"{where.lineno})", flush=True)
                        continue
                    if b in first:
                        compare(label, b, outs, first[b])
                    else:
                        first[b] = label, outs
        if args.speculate and variant == "bf16":
            speculate(lm, args.speculate, prompt, new)
        del lm


if __name__ == "__main__":
    main()
