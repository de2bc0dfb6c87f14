"""Held-out perplexity of a trained model with and without int8 weights (jaxlm.generate.quantize).

Trains configs/tiny.yaml (the README's CPU run) into a temporary run directory, loads its last
checkpoint the way `python -m jaxlm.generate --run` does, and evaluates the run's own eval
batches through jaxlm's training loss (jaxlm.step.make_loss_fn: the objective the run's eval
loss uses) on one device, once with the full weights and once with the int8 state. Prints both
losses and perplexities and the relative perplexity change.

    python benchmarks/quantize_ppl.py [--eval-batches 16] [key.sub=value ...]   # ~2 min on CPU
"""
from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def train(run_dir: Path, overrides: list[str]) -> None:
    cmd = [sys.executable, "-m", "jaxlm.train", "--config", "configs/tiny.yaml",
           f"train.run_dir={run_dir}", *overrides]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def held_out_loss(lm, cfg, batches) -> float:
    """(mean token NLL, tokens) of the eval batches under lm's state (int8 leaves dequantise on
    read)."""
    import jax
    from jaxlm.config_schema import MESH_AXES
    from jaxlm.parallel.sharding import make_mesh
    from jaxlm.step import make_loss_fn
    mesh = make_mesh(dict.fromkeys(MESH_AXES, 1), jax.devices()[:1])
    loss_fn = make_loss_fn(cfg, mesh, lm.graphdef)
    step = jax.jit(lambda state, b: loss_fn(state, b)[0][:2])
    nll = count = 0.0
    for b in batches:
        n, c = step(lm.state, b)
        nll, count = nll + float(n), count + float(c)
    return nll / count, int(count)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval-batches", type=int, default=16, help="the run's eval rows, x16")
    p.add_argument("--run", help="an existing run directory (skip training)")
    p.add_argument("overrides", nargs="*", help="training overrides, e.g. train.steps=100")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.run or Path(tmp) / "tiny")
        if not args.run:
            t0 = time.perf_counter()
            train(run_dir, args.overrides)
            print(f"trained configs/tiny.yaml in {time.perf_counter() - t0:.0f} s")
        from jaxlm.data import build_datasets, eval_batches
        from jaxlm.generate.lm import LM
        from jaxlm.generate.load import load_run
        from jaxlm.generate.quantize import weight_bytes
        loaded = load_run(str(run_dir))
        cfg, lm = loaded.config, loaded.lm
        data = build_datasets(cfg.data, cfg.model.vocab_size, cfg.model.objective)
        batches = [{k: b[k] for k in data.fields} for b in
                   eval_batches(data.eval, cfg.train.global_batch_size, args.eval_batches)]
        int8 = LM.of(lm.cfg, lm.state, quantize="int8")
        (full_loss, tokens), (int8_loss, _) = (held_out_loss(lm, cfg, batches),
                                               held_out_loss(int8, cfg, batches))
    print(f"step {loaded.step}: {tokens} held-out tokens ({args.eval_batches} eval batches)")
    print(f"weights: {weight_bytes(lm.state) / 1e6:.2f} MB full, "
          f"{weight_bytes(int8.state) / 1e6:.2f} MB int8 (scales, table and norms included)")
    print(f"full: loss {full_loss:.4f}  ppl {math.exp(full_loss):.4f}")
    print(f"int8: loss {int8_loss:.4f}  ppl {math.exp(int8_loss):.4f}")
    print(f"relative perplexity change: {math.exp(int8_loss - full_loss) - 1:+.3%}")


if __name__ == "__main__":
    main()
