"""`python -m jaxlm.generate` on a run directory: streaming and JSONL output, and one clear
line (exit code 2) for each kind of bad input."""
import contextlib
import json

import pytest

from jaxlm.checkpoint import Checkpointer
from jaxlm.config import dump_yaml, load_config
from jaxlm.generate.cli import main
from jaxlm.parallel.sharding import make_mesh
from jaxlm.config_schema import MESH_AXES
from jaxlm.state import build_state

import jax

LLAMA = ["model.vocab_size=300", "model.d_model=32", "model.num_layers=2", "model.num_heads=4",
         "model.num_kv_heads=2", "model.ffn_dim=64", "data.seq_len=32",
         "checkpoint.async_save=false"]


def make_run(path, overrides):
    cfg = load_config(None, overrides + [f"train.run_dir={path}"])
    spec = build_state(cfg, make_mesh(dict.fromkeys(MESH_AXES, 1), jax.devices()[:1]))
    ckpt = Checkpointer(path / "checkpoints", cfg.checkpoint)
    ckpt.save(3, spec.init(0), {"iterator": {}, "fingerprint": ""})
    ckpt.wait()
    ckpt.close()
    (path / "config.yaml").write_text(dump_yaml(cfg))
    return cfg


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen_run")
    make_run(path, LLAMA)
    return path


def gen(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_one_prompt_streams_and_many_write_jsonl(run_dir, capsys, tmp_path):
    rc, out, err = gen(capsys, "--run", run_dir, "--prompt", "def ", "--max-tokens", 6,
                       "--temperature", 0)
    assert rc == 0 and out.startswith("def ") and err == ""
    prompts = tmp_path / "p.txt"
    prompts.write_text('abc\n{"prompt": "x = "}\n\n')
    rc, out, _ = gen(capsys, "--run", run_dir, "--prompt-file", prompts, "--max-tokens", 4,
                     "--step", 3, "--seed", 5)
    records = [json.loads(line) for line in out.splitlines()]
    assert rc == 0 and [r["prompt"] for r in records] == ["abc", "x = "]
    assert all(r["tokens"] <= 4 and r["finish_reason"] in ("stop", "length") for r in records)
    rc, out2, _ = gen(capsys, "--run", run_dir, "--prompt-file", prompts, "--max-tokens", 4,
                      "--seed", 5)
    assert out2 == out  # seeds reproduce


@pytest.fixture(scope="module")
def gpt2_in_llama_dir(tmp_path_factory, run_dir):
    """A run directory whose config says llama but whose checkpoint is a GPT-2's."""
    path = tmp_path_factory.mktemp("mixed_run")
    make_run(path, [o for o in LLAMA if "kv_heads" not in o and "ffn" not in o]
             + ["model.family=gpt2", "model.max_positions=32"])
    (path / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    return path


BAD = {
    "unknown run dir": (["--run", "{missing}", "--prompt", "a"], "--run"),
    "no such step": (["--run", "{run}", "--step", "99", "--prompt", "a"], "--step 99"),
    "empty prompt": (["--run", "{run}", "--prompt", ""], "prompt 1 is empty"),
    "prompt beyond context": (["--run", "{run}", "--prompt", "x" * 40], "context"),
    "top-p out of range": (["--run", "{run}", "--prompt", "a", "--top-p", "0"], "--top-p"),
    "top-p above one": (["--run", "{run}", "--prompt", "a", "--top-p", "1.5"], "--top-p"),
    "missing prompt file": (["--run", "{run}", "--prompt-file", "{missing}"], "--prompt-file"),
    "two decoding modes": (["--run", "{run}", "--prompt", "a", "--beams", "2",
                            "--prompt-lookup", "2"], "cannot be combined"),
    "bad mesh": (["--run", "{run}", "--prompt", "a", "--mesh", "rows=2"], "--mesh"),
    "another family's checkpoint": (["--run", "{mixed}", "--prompt", "a"], "does not match"),
    "not a number": (["--run", "{run}", "--max-tokens", "many"], "--max-tokens"),
    "bad cache dtype": (["--run", "{run}", "--prompt", "a", "--cache-dtype", "int4"],
                        "--cache-dtype"),
}
PARSER_ERRORS = ("not a number", "bad cache dtype")  # argparse's: they raise SystemExit


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line(case, run_dir, gpt2_in_llama_dir, tmp_path, capsys):
    argv, needle = BAD[case]
    argv = [a.format(run=run_dir, missing=tmp_path / "nope", mixed=gpt2_in_llama_dir)
            for a in argv]
    parser = case in PARSER_ERRORS
    with pytest.raises(SystemExit) if parser else contextlib.nullcontext() as exit_info:
        rc, out, err = gen(capsys, *argv)
    if parser:
        rc, err = exit_info.value.code, capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err

