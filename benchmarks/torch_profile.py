"""The torch.compile peer's training step, broken down like benchmarks/step_profile.py breaks
down jaxlm's: the peer (../shared/bench/ref_models.py, carried as .peer/) trains under
torch.profiler, and every GPU kernel of three steps is put in the same categories (matmuls
forward / backward, attention forward / backward, cross-entropy and head, norms, optimizer
update, copies and transposes, other elementwise).

  python3 benchmarks/torch_profile.py [--ref .peer/ref_models.py] [--steps 3] ['{"json": ...}']
      [--beside $OUT/profile_step.json]   # step_profile.py's breakdown, side by side

Forward or backward is not guessed from kernel names: a kernel is backward when the CPU call
that launched it ran inside autograd's backward (an `autograd::engine::evaluate_function` op),
and an optimizer kernel when it was launched inside `Optimizer.step`. The other categories come
from kernel names: cuBLAS / nvjet / CUTLASS GEMMs, flash / cuDNN attention, and the fused op
names that Inductor writes into its Triton kernels' names (`triton_red_fused_..._rsqrt_...`).
Writes $OUT/profile_torch.json when $OUT is set.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import importlib.util
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.step_profile import ATTENTION_KERNEL, GEMM_KERNEL  # noqa: E402

# jaxlm's kernel names, and what only torch's kernels are called: the two breakdowns must agree
GEMM = GEMM_KERNEL + ("splitkreduce",)
ATTENTION = ATTENTION_KERNEL + ("sdpa",)
CROSS_ENTROPY = ("nll", "log_softmax", "logsumexp", "cross_entropy")
NORM = ("rsqrt",)  # Inductor's RMSNorm fusions: mean, pow, rsqrt
COPY = ("copy", "transpose", "clone", "cat_", "elementwise_kernel_with_index", "memcpy",
        "memset")


def category(kernel: str, backward: bool, optimizer: bool) -> str:
    """One of step_profile.py's rows for a kernel of the torch step."""
    low = kernel.lower()
    if optimizer or "adam" in low or "multi_tensor" in low:
        return "optimizer update"
    # attention first: cuDNN's fused attention kernels are named sm90_..., like GEMMs
    if any(s in low for s in ATTENTION):
        return "attention " + ("backward" if backward or "bwd" in low or "bprop" in low
                               else "forward")
    if any(s in low for s in GEMM):
        return "matmul " + ("backward" if backward else "forward")
    if any(s in low for s in CROSS_ENTROPY):
        return "cross-entropy and head"
    if any(s in low for s in NORM):
        return "norms"
    if any(s in low for s in COPY):
        return "copies and transposes"
    return "other elementwise"


def _intervals(events, match) -> dict:
    """{thread: sorted [(start, end)]} of the CPU ops and annotations (`Optimizer.step#...` is
    one) whose name `match`es."""
    out = collections.defaultdict(list)
    for e in events:
        if (e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation")
                and match(e.get("name", ""))):
            out[e["tid"]].append((e["ts"], e["ts"] + e.get("dur", 0)))
    return {t: sorted(v) for t, v in out.items()}


def _inside(intervals: dict, tid, ts) -> bool:
    spans = intervals.get(tid, [])
    i = bisect.bisect_right(spans, (ts, float("inf"))) - 1
    # spans may nest: any one that starts before ts and ends after it
    return any(s <= ts <= e for s, e in spans[max(0, i - 64):i + 1])


def breakdown(trace: dict, steps: int) -> dict:
    """{"kernel_ms", "categories", "kernels"} per step from a torch.profiler chrome trace."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    backward = _intervals(events, lambda n: n.startswith("autograd::engine::evaluate_function"))
    optimizer = _intervals(events, lambda n: n.startswith("Optimizer.step"))
    launches = {}  # correlation id -> (thread, time) of the runtime call that launched it
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver"):
            corr = (e.get("args") or {}).get("correlation")
            if corr is not None:
                launches[corr] = (e["tid"], e["ts"])
    by_cat, by_kernel = collections.defaultdict(float), collections.defaultdict(float)
    total = unlaunched = 0.0
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        ms = e.get("dur", 0) / 1e3 / steps
        tid, ts = launches.get((e.get("args") or {}).get("correlation"), (None, None))
        if ts is None:  # launched before the traced steps (the GPU runs behind the CPU)
            unlaunched += ms
            continue
        bwd, opt = _inside(backward, tid, ts), _inside(optimizer, tid, ts)
        by_cat[category(e["name"], bwd, opt)] += ms
        by_kernel[e["name"][:100]] += ms
        total += ms
    return {"kernel_ms": total, "categories": dict(by_cat), "kernels": dict(by_kernel),
            "left_out_ms": unlaunched}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", default=".peer/ref_models.py", help="the peer's ref_models.py")
    ap.add_argument("--steps", type=int, default=3, help="steps traced, after 6 untraced")
    ap.add_argument("overrides", nargs="?", default="{}", help="JSON config overrides")
    ap.add_argument("--beside", help="a profile_<tag>.json of benchmarks/step_profile.py: print "
                                     "jaxlm's categories beside torch's")
    args = ap.parse_args(argv)
    for flag, path in (("--ref", args.ref), ("--beside", args.beside)):
        if path and not os.path.exists(path):
            ap.error(f"{flag} {path}: no such file" + (
                " (copy ../shared/bench/ref_models.py to .peer/)" if flag == "--ref" else ""))
    import torch.optim.optimizer as optim
    from torch.profiler import ProfilerActivity, profile, schedule

    spec = importlib.util.spec_from_file_location("ref_models", args.ref)
    ref = importlib.util.module_from_spec(spec)
    sys.argv = [args.ref]  # the peer reads its overrides from argv[2] at import: ours are not
    spec.loader.exec_module(ref)
    ref.CFG.update(json.loads(args.overrides))
    # the peer's own loop: compile + 3 warm-up steps + 10 timed; every optimizer step advances
    # the profiler's schedule, so the traced steps are warm ones (the peer's printed step time
    # is the profiled one, slower than its benchmark: the breakdown is what counts here)
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                   schedule=schedule(wait=5, warmup=1, active=args.steps, repeat=1))
    hook = optim.register_optimizer_step_post_hook(lambda *a: prof.step())
    with prof:
        ref.run_torch()
    hook.remove()
    path = os.path.join(tempfile.mkdtemp(prefix="torch-trace-"), "trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        result = breakdown(json.load(f), args.steps)
    total = result["kernel_ms"]
    print(f"\n### torch.compile ({ref.CFG}): GPU kernels {total:.1f} ms/step (left out: "
          f"{result['left_out_ms']:.1f} ms/step of kernels launched before the traced steps)")
    print("| category | ms/step | share |\n|---|---|---|")
    for k, v in sorted(result["categories"].items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {v:.1f} | {v / max(total, 1e-9):.1%} |")
    print("top kernels:")
    for k, v in sorted(result["kernels"].items(), key=lambda kv: -kv[1])[:20]:
        print(f"  {v:7.2f} ms  {k}")
    if args.beside:
        with open(args.beside) as f:
            print(side_by_side(json.load(f), result))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "profile_torch.json"), "w") as f:
            json.dump({"config": ref.CFG, **result}, f, indent=1)


def side_by_side(jaxlm: dict, torch: dict) -> str:
    """A markdown table of ms per step by category: jaxlm (step_profile.py's JSON), torch, and
    the difference, largest jaxlm-minus-torch first (where jaxlm has the most to win)."""
    a, b = jaxlm["categories"], torch["categories"]
    rows = sorted(set(a) | set(b), key=lambda k: (-(a.get(k, 0.0) - b.get(k, 0.0)), k))
    lines = ["| category | jaxlm ms | torch.compile ms | jaxlm - torch |", "|---|---|---|---|"]
    lines += [f"| {k} | {a.get(k, 0.0):.1f} | {b.get(k, 0.0):.1f} | "
              f"{a.get(k, 0.0) - b.get(k, 0.0):+.1f} |" for k in rows]
    lines.append(f"| GPU kernels in all | {jaxlm['kernel_ms']:.1f} | {torch['kernel_ms']:.1f} | "
                 f"{jaxlm['kernel_ms'] - torch['kernel_ms']:+.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
