"""Speculative decoding with a *trained* small draft, in one call on one GPU.

With random weights no small model predicts the target (benchmarks/decode.py --speculate can only
use the target's own int8 copy as a draft). Here both are trained first, on the same local
corpus with the same byte tokenizer, through the real `python -m jaxlm.train` (each in its own
process, with a time limit that keeps what finished): the target is the 1B preset's shape, the
draft a 4-layer model ~80x smaller. Then, batch 1, greedy, for each prompt: plain decoding,
speculative decoding with the draft (K drafts a round) and prompt lookup (3-grams); tokens/s
end to end after a compile, the draft's acceptance, and whether the output equals plain greedy
(bf16 on a GPU: the verify pass reads K + 1 positions per matmul, plain decode one, so a near
tie can flip a token; on CPU in float32 they are equal, tests/test_generate.py).

    PYTHONPATH=. python3 benchmarks/speculative.py [--target-steps 600] [--draft-steps 600]
        [--K 4] [--new 256] [--out DIR]             # on the GPU
    PYTHONPATH=. python3 benchmarks/speculative.py --smoke   # tiny, on CPU: does it run
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = ["def ", "import os\n", "class ", "    def __init__(self", "for i in range(",
           "    return ", "if __name__ == "]
COMMON = ["model.vocab_size=512", "data.source=stdlib", "model.dtype=bfloat16",
          "checkpoint.enabled=true", "checkpoint.async_save=false", "log.tensorboard=false",
          "log.progress=false", "train.eval_every=0"]
DRAFT = ["model.d_model=512", "model.num_layers=4", "model.num_heads=8", "model.num_kv_heads=8",
         "model.ffn_dim=1536", "model.scan_unroll=1"]
SMOKE = ["runtime.cpu_devices=0", "mesh.fsdp=1", "model.d_model=64", "model.num_layers=2",
         "model.num_heads=4", "model.num_kv_heads=4", "model.ffn_dim=128", "data.seq_len=128",
         "data.max_bytes=200000", "train.global_batch_size=8", "model.dtype=float32",
         "model.scan_unroll=1"]


def train(name: str, config: str, overrides: list[str], steps: int, out: Path, timeout: int):
    """`python -m jaxlm.train` into out/name, saving at the last step; the run dir or None."""
    run_dir = out / name
    cmd = [sys.executable, "-m", "jaxlm.train", "--config", config, *COMMON, *overrides,
           f"train.steps={steps}", f"checkpoint.every_steps={steps}", f"train.run_dir={run_dir}",
           f"log.every_steps={max(steps // 10, 1)}"]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, timeout=timeout, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        done = False
    print(f"RESULT train {name}: {'done' if done else 'FAILED or timed out'} in "
          f"{time.perf_counter() - t0:.0f} s ({steps} steps)", flush=True)
    return run_dir if done else None


def last_loss(run_dir: Path) -> float | None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    return losses[-1] if losses else None


def measure(target_dir: Path, draft_dir: Path | None, K: int, new: int) -> list[dict]:
    from jaxlm.generate.engine import Engine, Request
    from jaxlm.generate.load import load_run
    from jaxlm.generate.sampling import SamplingConfig
    from jaxlm.generate.speculative import Speculator
    target = load_run(str(target_dir))
    tok = target.tokenizer
    drafters = [("prompt lookup (3-grams)", Speculator(target.lm, K, None, ngram=3))]
    if draft_dir is not None:
        drafters.insert(0, ("trained draft", Speculator(target.lm, K, None,
                                                        load_run(str(draft_dir)).lm)))
    plain = Engine(target.lm, eos_id=None)  # no stop token: every prompt makes `new` tokens
    rows = []
    for prompt in PROMPTS:
        req = Request(tok.encode(prompt), SamplingConfig(temperature=0.0, max_tokens=new))
        plain.generate([req])  # compile
        t0 = time.perf_counter()
        ids = plain.generate([req])[0].ids
        row = {"prompt": prompt, "plain_tps": new / (time.perf_counter() - t0),
               "text": tok.decode(ids)[:80]}
        for name, spec in drafters:
            spec.generate(req)  # compile
            t0 = time.perf_counter()
            out = spec.generate(req)
            tps = len(out.ids) / (time.perf_counter() - t0)
            differ = next((i for i, (a, b) in enumerate(zip(out.ids, ids)) if a != b), None)
            row[name] = {"tps": tps, "speedup": tps / row["plain_tps"],
                         "acceptance": out.acceptance, "first_difference": differ}
            print(f"RESULT {prompt!r} {name}: {tps:,.0f} tokens/s vs plain {row['plain_tps']:,.0f}"
                  f" ({tps / row['plain_tps']:.2f}x), acceptance {out.acceptance:.1%}, "
                  f"{'equals plain greedy' if differ is None else f'differs at token {differ}'}",
                  flush=True)
        rows.append(row)
    for name, _ in drafters:
        speedups = [r[name]["speedup"] for r in rows]
        accept = [r[name]["acceptance"] for r in rows]
        print(f"RESULT {name}, K={K}, mean over {len(rows)} prompts: "
              f"{sum(speedups) / len(rows):.2f}x plain, acceptance {sum(accept) / len(rows):.1%}",
              flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny models and lengths (CPU)")
    p.add_argument("--config", default="configs/llama-1b.yaml", help="the target's preset")
    p.add_argument("--target-steps", type=int, default=600)
    p.add_argument("--draft-steps", type=int, default=600)
    p.add_argument("--K", type=int, default=4)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--timeout", type=int, default=240, help="seconds each training may take")
    p.add_argument("--out", default="runs/speculative")
    args = p.parse_args(argv)
    out = Path(args.out)
    extra, config = (SMOKE, "configs/tiny.yaml") if args.smoke else ([], args.config)
    if args.smoke:
        args.target_steps, args.draft_steps, args.new = 20, 20, 16
    target = train("target", config, extra, args.target_steps, out, args.timeout)
    if target is None:
        return 1
    smoke_draft = ["model.d_model=32", "model.num_layers=1"] if args.smoke else []
    draft = train("draft", config, extra + DRAFT + smoke_draft, args.draft_steps, out,
                  args.timeout)
    losses = {"target": last_loss(target), "draft": last_loss(draft) if draft else None}
    print(f"RESULT last training loss (nats/byte): {losses}", flush=True)
    rows = measure(target, draft, args.K, args.new)
    (out / "speculative.json").write_text(json.dumps({"losses": losses, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
