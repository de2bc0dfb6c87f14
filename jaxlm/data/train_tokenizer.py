"""Train a tokenizer on a local corpus: SentencePiece (`.model`) or byte-level BPE
(Hugging Face `tokenizer.json`). Ids 0, 1, 2 are pad, bos, eos, as for the byte tokenizer.

The output is written to a temporary name and renamed, so a crash never leaves a file that a
run would try to load.
"""
from __future__ import annotations

import io
import itertools
import os
from pathlib import Path

from jaxlm.config import ConfigError
from jaxlm.data.files import list_files, read_documents

SPECIALS = ("<pad>", "<s>", "</s>")


def _lines(docs, max_chars: int):
    """Non-empty lines of the documents (SentencePiece trains on sentences, and skips long
    ones), up to max_chars in all."""
    total = 0
    for _, text in docs:
        for line in text.splitlines():
            if line.strip():
                yield line
                total += len(line)
                if total >= max_chars:
                    return


def _write_atomic(out: Path, data: bytes):
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)


def train_sentencepiece(docs, out: Path, vocab_size: int, model_type: str = "bpe",
                        max_chars: int = 200_000_000) -> Path:
    import sentencepiece as spm
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(docs, max_chars), model_writer=model,
            vocab_size=vocab_size, model_type=model_type, pad_id=0, bos_id=1, eos_id=2,
            unk_id=3, byte_fallback=True, character_coverage=0.9995,
            num_threads=os.cpu_count() or 1, minloglevel=2, hard_vocab_limit=True,
            train_extremely_large_corpus=False)
    except RuntimeError as e:
        raise ConfigError(f"sentencepiece training failed: {str(e).splitlines()[0]} (a smaller "
                          f"--vocab-size or a larger corpus may help)") from None
    _write_atomic(out, model.getvalue())
    return out


def train_bpe(docs, out: Path, vocab_size: int, max_chars: int = 200_000_000) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_lines(docs, max_chars), trainer=trainer)
    _write_atomic(out, tok.to_str().encode("utf-8"))
    return out


def train(kind: str, input_path: str, out: str, vocab_size: int, text_field: str = "text",
          max_docs: int | None = None, model_type: str = "bpe") -> Path:
    """Train from `input_path` (folder, file or glob of .txt/.jsonl/.parquet)."""
    docs = read_documents(list_files(input_path), text_field)
    if max_docs:
        docs = itertools.islice(docs, max_docs)
    if kind == "sentencepiece":
        return train_sentencepiece(docs, Path(out), vocab_size, model_type)
    if kind == "bpe":
        return train_bpe(docs, Path(out), vocab_size)
    raise ConfigError(f"--kind: {kind!r} is not one of: sentencepiece, bpe")
