"""`python -m jaxlm.data train-tokenizer ...` and `python -m jaxlm.data prepare ...`.

prepare builds the configured datasets' caches (local corpora as tfds datasets, token arrays)
without starting JAX: run it once before a multi-host job so no process tokenizes on the clock.
"""
from __future__ import annotations

import argparse
import sys

from jaxlm.config import ConfigError, load_config


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, like every other bad input
        self.exit(2, f"error: {message} (see python -m jaxlm.data --help)\n")


def main(argv=None) -> int:
    p = _Parser(prog="python -m jaxlm.data", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train-tokenizer", help="train a tokenizer on a local corpus")
    t.add_argument("--input", required=True, help="folder, file or glob of .txt/.jsonl/.parquet")
    t.add_argument("--out", required=True, help="output .model (sentencepiece) or .json (bpe)")
    t.add_argument("--kind", choices=("sentencepiece", "bpe"), default="sentencepiece")
    t.add_argument("--vocab-size", type=int, default=8000)
    t.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe",
                   help="sentencepiece model type")
    t.add_argument("--text-field", default="text", help="JSONL/parquet field with the text")
    t.add_argument("--max-docs", type=int, default=None, help="train on the first N documents")
    r = sub.add_parser("prepare", help="build the data caches of a config, without JAX")
    r.add_argument("--config", action="append", default=[], metavar="FILE")
    r.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "train-tokenizer":
            from jaxlm.data.tokenizer import load_tokenizer
            from jaxlm.data.train_tokenizer import train
            out = train(args.kind, args.input, args.out, args.vocab_size, args.text_field,
                        args.max_docs, args.model_type)
            tok = load_tokenizer("sentencepiece" if args.kind == "sentencepiece"
                                 else "huggingface", str(out))
            print(f"wrote {out}: {tok.vocab_size} tokens (data.tokenizer={tok.name} "
                  f"data.tokenizer_path={out})")
        else:
            from jaxlm.data.loader import build_datasets
            cfg = load_config(args.config, args.overrides)
            bundle = build_datasets(cfg.data, cfg.model.vocab_size, cfg.model.objective)
            print(f"data ready: {bundle.train.num_rows:,} train rows, {bundle.eval.num_rows:,} "
                  f"eval rows of {cfg.data.seq_len + 1} tokens; fingerprint {bundle.fingerprint}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
