"""KV cache bytes per token (all layers) of the MHA, GQA, MQA and MLA presets, in bf16 and int8,
read off the shapes of the real caches (jax.eval_shape of LM.empty_cache: no hand formulas, no
weights materialised). int8 counts its float32 scales (one per token, layer and kv head); the
int32 segment id every cache keeps per token is bookkeeping and is not counted.

    PYTHONPATH=. python benchmarks/cache_bytes.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (name, attention, preset, overrides): MQA is the 1B Llama with one kv head
PRESETS = [
    ("llama-1b", "MHA", "configs/llama-1b.yaml", []),
    ("llama3-8b", "GQA", "configs/llama3-8b.yaml", []),
    ("llama-1b kv_heads=1", "MQA", "configs/llama-1b.yaml", ["model.num_kv_heads=1"]),
    ("deepseek-1b", "MLA", "configs/deepseek-1b.yaml", []),
]
DTYPES = ("bfloat16", "int8")


def abstract_lm(config: str, overrides: list[str], cache_dtype: str):
    """The preset's LM over abstract weights (shapes only)."""
    from flax import nnx
    from jaxlm.config import load_config
    from jaxlm.generate.lm import LM
    from jaxlm.models.registry import build_model
    cfg = load_config(config, ["model.dtype=bfloat16"] + overrides).model
    state = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))))
    return LM.of(cfg, state, cache_dtype=cache_dtype)


def table() -> list[dict]:
    from benchmarks.decode import kv_bytes_per_token
    rows = []
    for name, kind, config, overrides in PRESETS:
        row = {"preset": name, "attention": kind}
        for dtype in DTYPES:
            lm = abstract_lm(config, overrides, dtype)
            row["layers"] = lm.cfg.num_layers
            row[dtype] = kv_bytes_per_token(lm)
        rows.append(row)
    return rows


def main():
    rows = table()
    print("| preset | attention | layers | bf16 B/token | per layer | int8 B/token | int8 / bf16 "
          "| GiB at 32k tokens (bf16 / int8) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        bf16, int8 = r["bfloat16"], r["int8"]
        print(f"| {r['preset']} | {r['attention']} | {r['layers']} | {bf16:,} | "
              f"{bf16 // r['layers']:,} | {int8:,} | {int8 / bf16:.3f} | "
              f"{bf16 * 32768 / 2**30:.2f} / {int8 * 32768 / 2**30:.2f} |")


if __name__ == "__main__":
    main()
