"""The data pipeline inside a training run: a mixture of a local corpus and a token file,
read ahead on a thread, resumes bit-for-bit, and the data-wait time is logged."""
import json

import numpy as np

from jaxlm.train import run
from helpers import tiny_config


def _losses(run_dir):
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def test_mixture_run_resumes_exactly_and_logs_data_wait(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    lines = [json.dumps({"text": " ".join(rng.choice(["ab", "cd", "efg", "h"], 40))})
             for _ in range(200)]
    (corpus / "a.jsonl").write_text("\n".join(lines) + "\n")
    docs = [np.append(rng.integers(3, 259, rng.integers(5, 60)), 2) for _ in range(300)]
    np.concatenate(docs).astype(np.uint16).tofile(tmp_path / "tokens.bin")
    mixture = (f"data.mixture=[{{source: files, path: '{corpus}', weight: 2}}, "
               f"{{source: tokens, path: '{tmp_path / 'tokens.bin'}', weight: 1}}]")
    common = ["data.source=mixture", mixture, f"data.cache_dir={tmp_path / 'cache'}",
              "data.prefetch=3", "train.steps=4", "checkpoint.every_steps=2"]
    run(tiny_config(*common, f"train.run_dir={tmp_path / 'full'}"))
    full = _losses(tmp_path / "full")
    assert all(r["data_wait_s"] >= 0 and r["data_wait_s"] < r["step_time_s"]
               for r in full.values())
    run(tiny_config(*common, f"train.run_dir={tmp_path / 'cut'}", "train.steps=2"))
    run(tiny_config(*common, f"train.run_dir={tmp_path / 'cut'}"))
    resumed = _losses(tmp_path / "cut")
    assert [resumed[s]["loss"] for s in (3, 4)] == [full[s]["loss"] for s in (3, 4)]
