"""Where the training step's GPU time goes: trace a few steps of the compiled step with
jax.profiler and attribute every kernel to a category through the compiled HLO's metadata (the
jaxlm or optax source line that produced the instruction), not by guessing from kernel names.

  PYTHONPATH=. python3 benchmarks/step_profile.py [--config configs/llama-1b.yaml]
      [--steps 3] [--tag NAME] [--hlo] [key=value ...]

Prints ms per step by category (matmuls forward / backward, attention forward / backward,
cross-entropy and head, norms, optimizer update, gradient norm and checks, copies and
transposes, other elementwise), the top source lines and the top kernels; writes
$OUT/profile_<tag>.json (and with --hlo the compiled HLO, hlo_<tag>.txt.gz, to read what a
fusion does) when $OUT is set.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?(?:custom_call_target=\"([^\"]+)\")?.*?"
                    r"metadata=\{([^}]*)\}")
_FIELD = re.compile(r'(\w+)="?([^" ]*)"?')
GEMM_KERNEL = ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_")
ATTENTION_KERNEL = ("flash", "mosaic", "attention", "fmha", "cudnn")


def _stacks(hlo_text: str) -> dict[str, list[str]]:
    """{stack frame id: ["file:line", ... innermost first]} from the module's FileNames,
    FileLocations and StackFrames tables (a frame's parent_frame_id is the parent's id + 1)."""
    files, locs, frames, section = {}, {}, {}, None
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            continue
        m = re.match(r"^(\d+) (.*)$", line)
        if not m:  # a table's rows end at the first line that is not one
            section = None
        if not m or section is None:
            continue
        key, rest = m.group(1), m.group(2)
        if section == "FileNames":
            files[key] = rest.strip('"')
        elif section == "FileLocations":
            f = dict(re.findall(r"(\w+)=(\d+)", rest))
            locs[key] = f"{files.get(f.get('file_name_id'), '?')}:{f.get('line', '?')}"
        elif section == "StackFrames":
            f = dict(re.findall(r"(\w+)=(\d+)", rest))
            frames[key] = (locs.get(f.get("file_location_id"), "?"), str(int(f["parent_frame_id"]) - 1))
    stacks = {}
    for key in frames:
        out, k = [], key
        while k in frames and len(out) < 64:
            out.append(frames[k][0])
            k = frames[k][1]
        stacks[key] = out
    return stacks


def hlo_metadata(hlo_text: str) -> dict[str, dict]:
    """{instruction name: {op_name, stack: [file:line innermost first], target}} from compiled
    HLO: the source lines that produced each instruction."""
    stacks, out = _stacks(hlo_text), {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m:
            meta = dict(_FIELD.findall(m.group(3)))
            meta["target"] = m.group(2) or ""
            meta["stack"] = stacks.get(meta.get("stack_frame_id", ""), [])
            out[m.group(1)] = meta
    return out


def source(meta: dict) -> str:
    """The innermost jaxlm (else any) source line of an instruction, shortened."""
    stack = meta.get("stack", [])
    line = next((s for s in stack if "/jaxlm/" in s or "kernels_pallas" in s), stack[0] if stack else "?")
    return "/".join(line.split("/")[-2:])


def category(kernel: str, meta: dict) -> str:
    """One of the breakdown's rows, from the kernel's name and its HLO instruction's metadata."""
    low, src = kernel.lower(), " ".join(meta.get("stack", []))
    op = meta.get("op_name", "")
    backward = "transpose(" in op
    if any(s in low for s in ATTENTION_KERNEL) or "kernels_pallas" in src:
        return "attention " + ("backward" if backward or "bwd" in low or "dkv" in low else "forward")
    if "cublas" in meta.get("target", "") or any(s in low for s in GEMM_KERNEL):
        return "matmul " + ("backward" if backward else "forward")
    if "optax" in src:
        return "optimizer update"
    if "head_loss" in src or "log_softmax" in op or "token_nll" in op:
        return "cross-entropy and head"
    inner = source(meta)
    if "norm.py" in inner or "rms_norm" in op or "layer_norm" in op:
        return "norms"
    if inner.startswith(("jaxlm/step.py", "jaxlm/health.py")) or "global_norm" in op:
        return "gradient norm and checks"
    if "copy" in low or "transpose" in low:
        return "copies and transposes"
    return "other elementwise"


def gpu_kernels(run, meta: dict) -> list[tuple[str, float, dict]]:
    """(kernel name, ms, HLO metadata or {}) of every GPU kernel that `run()` launches, read
    from a jax.profiler trace of it; `meta` is hlo_metadata of the compiled program run."""
    import jax
    tdir = tempfile.mkdtemp(prefix="jaxlm-trace-")
    with jax.profiler.trace(tdir, create_perfetto_trace=True):
        run()
    events = json.load(gzip.open(glob.glob(f"{tdir}/**/*perfetto*", recursive=True)[0]))
    events = events["traceEvents"] if isinstance(events, dict) else events
    pname = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    meta = {**meta, **{k.replace(".", "_").replace("-", "_"): v for k, v in meta.items()}}
    out = []
    for e in events:
        proc = pname.get(e.get("pid"), "")
        if e.get("ph") != "X" or not ("GPU" in proc or "/device" in proc):
            continue
        hlo_op = (e.get("args") or {}).get("hlo_op", "")
        out.append((e["name"], e.get("dur", 0) / 1e3, meta.get(hlo_op) or meta.get(e["name"]) or {}))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/llama-1b.yaml")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tag", default="step")
    ap.add_argument("--hlo", action="store_true", help="also write the compiled HLO to $OUT")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import jax
    import numpy as np
    from jaxlm.config import check_against_devices, load_config
    from jaxlm.data import synthetic_dataset
    from jaxlm.parallel.sharding import make_mesh
    from jaxlm.step import build_step_fns

    cfg = load_config([args.config], [f"train.run_dir=/tmp/profile-{time.time_ns()}", *args.overrides])
    mesh = make_mesh(check_against_devices(cfg, jax.device_count()))
    fns = build_step_fns(cfg, mesh)
    state = fns.init(cfg.train.seed)
    data = synthetic_dataset(cfg.data, cfg.model.vocab_size, cfg.model.objective)
    B = cfg.train.global_batch_size
    batch = jax.device_put(fns.lay_out({k: v for k, v in data.get(np.arange(B)).items()
                                        if k in data.fields}), fns.batch_sharding)
    step = fns.train_step.lower(state, batch).compile()
    hlo_text = step.as_text()
    meta = hlo_metadata(hlo_text)
    if args.hlo and os.environ.get("OUT"):
        with gzip.open(os.path.join(os.environ["OUT"], f"hlo_{args.tag}.txt.gz"), "wt") as f:
            f.write(hlo_text)
    for _ in range(3):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(10):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    step_ms = (time.perf_counter() - t0) / 10 * 1e3

    def run():
        nonlocal state
        for _ in range(args.steps):
            state, m = step(state, batch)
        jax.block_until_ready(m)
    by_cat, by_src, by_kernel = (collections.defaultdict(float) for _ in range(3))
    matched = total = 0.0
    for name, ms, info in gpu_kernels(run, meta):
        dur = ms / args.steps
        matched += dur if info else 0.0
        total += dur
        by_cat[category(name, info)] += dur
        by_src[source(info)] += dur
        by_kernel[name[:100]] += dur

    print(f"\n### {args.tag}: {' '.join(args.overrides) or 'defaults'}")
    print(f"step {step_ms:.1f} ms wall ({B * cfg.data.seq_len / step_ms * 1e3:,.0f} tokens/s); "
          f"GPU kernels {total:.1f} ms/step, {matched / max(total, 1e-9):.0%} of it matched to HLO metadata")
    print("| category | ms/step | share |\n|---|---|---|")
    for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {v:.1f} | {v / total:.1%} |")
    print("top source lines:", ", ".join(f"{k} {v:.1f}" for k, v in
                                         sorted(by_src.items(), key=lambda kv: -kv[1])[:12]))
    print("top kernels:")
    for k, v in sorted(by_kernel.items(), key=lambda kv: -kv[1])[:20]:
        print(f"  {v:7.2f} ms  {k}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], f"profile_{args.tag}.json"), "w") as f:
            json.dump({"tag": args.tag, "overrides": args.overrides, "step_ms": step_ms,
                       "kernel_ms": total, "categories": by_cat, "sources": by_src,
                       "kernels": by_kernel}, f, indent=1)


if __name__ == "__main__":
    main()
