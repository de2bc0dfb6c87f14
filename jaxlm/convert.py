"""`python -m jaxlm.convert import --hf DIR --out RUN_DIR [key=value ...]` and
`python -m jaxlm.convert export --run RUN_DIR [--step N] --out DIR [--dtype D]`: Hugging Face
model directories in and out.

import: a run directory whose config's model section comes from DIR/config.json (and DIR's
tokenizer is the data tokenizer) and whose step-0
checkpoint holds DIR's weights with a fresh optimizer state; `jaxlm.train --config
RUN_DIR/config.yaml` continues from it. (To fine-tune on other data, set `model.init_from: DIR`
in your own training config instead.) export: the weights of a run's checkpoint as an HF
directory that transformers' `from_pretrained` loads.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxlm import faults
from jaxlm.config import ConfigError


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(faults.EXIT_BAD_INPUT, f"error: {message} (usage: python -m jaxlm.convert "
                  f"import --hf DIR --out RUN_DIR | export --run RUN_DIR --out DIR)\n")


def parse_args(argv):
    p = _Parser(prog="python -m jaxlm.convert", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    imp = sub.add_parser("import", help="an HF model directory -> a jaxlm run directory")
    imp.add_argument("--hf", required=True, metavar="DIR")
    imp.add_argument("--out", required=True, metavar="RUN_DIR")
    imp.add_argument("overrides", nargs="*", metavar="key.sub=value",
                     help="config overrides, e.g. model.param_dtype=bfloat16 mesh.fsdp=8")
    exp = sub.add_parser("export", help="a jaxlm run's checkpoint -> an HF model directory")
    exp.add_argument("--run", required=True, metavar="RUN_DIR")
    exp.add_argument("--step", type=int, default=None, help="default: the newest checkpoint")
    exp.add_argument("--out", required=True, metavar="DIR")
    exp.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    exp.add_argument("--max-shard-gib", type=float, default=5.0)
    return p.parse_args(argv)


def _mesh(cfg):
    import dataclasses

    import jax

    from jaxlm.config import check_against_devices
    from jaxlm.parallel.sharding import make_mesh
    sizes = check_against_devices(cfg, jax.device_count())
    return make_mesh(sizes, dcn_sizes=dataclasses.asdict(cfg.mesh.dcn))


def import_hf(hf_dir: str, run_dir: str, overrides=()) -> Path:
    """Write run_dir/config.yaml and a step-0 checkpoint of hf_dir's weights."""
    from jaxlm import rundir
    from jaxlm.checkpoint import Checkpointer
    from jaxlm.config import load_config
    from jaxlm.hf.load import load
    from jaxlm.state import build_state
    cfg = load_config(None, [f"model.init_from={hf_dir}", f"train.run_dir={run_dir}",
                             *overrides])
    out = Path(run_dir)
    if (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
        raise ConfigError(f"{out}: already holds checkpoints; import into a new directory")
    rundir.check(cfg)
    spec = build_state(cfg, _mesh(cfg))
    abstract = {k: v for k, v in spec.abstract_state.items() if k in ("params", "model_state")}
    state = spec.from_weights(load(hf_dir, cfg.model, abstract), cfg.train.seed)
    cfg.model.init_from = ""  # the checkpoint holds the weights now (and names their origin)
    rundir.prepare(cfg, 0)
    ckpt = Checkpointer(out / "checkpoints", cfg.checkpoint)
    try:
        ckpt.save(0, state, {"iterator": {}, "fingerprint": None,
                             "imported_from": str(Path(hf_dir).absolute())})
        ckpt.wait()
    finally:
        ckpt.close()
    return ckpt.step_dir(0)


def export_run(run_dir: str, out_dir: str, step: int | None = None, dtype: str = "float32",
               max_shard_bytes: int = 5 * 2**30) -> tuple[int, list[str]]:
    """Write the weights of run_dir's checkpoint `step` (None: the newest) to out_dir."""
    from jaxlm.checkpoint import read_run_config, restore_variables, run_step_dir
    from jaxlm.hf.export import export
    from jaxlm.hf.registry import for_family
    from jaxlm.state import abstract_weights
    cfg = read_run_config(run_dir)
    mapping = for_family(cfg.model.family)
    mapping.config_to_hf(cfg.model, max_positions=cfg.data.seq_len)  # refuse before reading
    step, step_dir = run_step_dir(run_dir, cfg, step)
    weights = restore_variables(step_dir, abstract_weights(cfg.model, _mesh(cfg), cfg.mesh.rules))
    return step, export(cfg, weights, out_dir, dtype, max_shard_bytes)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "import":
            where = import_hf(args.hf, args.out, args.overrides)
            print(f"imported {args.hf} into {args.out} (checkpoint {where})")
        else:
            step, files = export_run(args.run, args.out, args.step, args.dtype,
                                     int(args.max_shard_gib * 2**30))
            print(f"exported step {step} of {args.run} to {args.out} ({len(files)} files)")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return faults.EXIT_BAD_INPUT
    except OSError as e:
        print(f"error: cannot write {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return faults.EXIT_WRITE_FAILED
    return faults.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
