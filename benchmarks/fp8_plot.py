"""Draw the loss curves benchmarks/fp8.py wrote (its $OUT/fp8.json) into one PNG:
  python3 benchmarks/fp8_plot.py fp8.json benchmarks/fp8_loss.png
Needs matplotlib (not a jaxlm dependency)."""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src, dst):
    data = json.load(open(src))
    fig, (whole, tail) = plt.subplots(1, 2, figsize=(11, 4))
    for row in data["rows"]:
        if "curve" not in row:
            continue
        steps, loss = zip(*row["curve"])
        label = row.get("label") or (  # a run's own label, else its precision and speed
            {"default": "bf16", "fp8": "fp8"}.get(row["precision"], row["precision"])
            + (f" seed {row['seed']}" if row.get("seed") is not None else "")
            + f" ({row['tokens_per_sec']:,.0f} tokens/s)")
        whole.plot(steps, loss, label=label, lw=1)
        cut = len(steps) // 2
        tail.plot(steps[cut:], loss[cut:], label=label, lw=1)
    whole.set_title(f"1B preset, stdlib bytes: {data['steps']} steps")
    tail.set_title("second half")
    for ax in (whole, tail):
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
