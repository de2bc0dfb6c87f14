"""Tokenizers behind one small interface: byte-level (no files), SentencePiece, Hugging Face.

Packing only needs `encode_batch`, `eos_id` and `vocab_size`; `fingerprint` keys the token cache,
so a changed tokenizer file never reuses tokens made by the old one. Masked LM and span corruption
also ask for `mask_id`, `sentinel_id(i)` and `special_ids()`: a tokenizer file that lacks a needed
token is one ConfigError naming the file and the token, raised only when an objective asks.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from jaxlm.config import ConfigError

NUM_SPECIAL = 3  # pad, bos, eos come before the 256 byte ids
# Names tried, in order, for the end-of-document token of a tokenizer.json without a
# tokenizer_config.json beside it.
EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")
MASK_NAMES = ("[MASK]", "<mask>")  # the masked-LM token, tried in order (BERT's, RoBERTa's)
SENTINEL = "<extra_id_{}>"  # span-corruption sentinel i (T5's "extra ids")


def _text(doc: str | bytes) -> str:
    return doc if isinstance(doc, str) else bytes(doc).decode("utf-8", errors="replace")


def _threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


class ByteTokenizer:
    """UTF-8 bytes as tokens: pad=0, bos=1, eos=2, byte b -> b + 3 (vocab 259). Masked LM and
    span corruption use "extra ids" above the byte vocabulary: mask 259, sentinel i 260 + i (the
    model's vocab_size must reach them; the tokenizer's own vocab_size stays 259)."""

    name = "byte"
    pad_id = 0
    bos_id = 1
    eos_id = 2
    vocab_size = 256 + NUM_SPECIAL
    mask_id = vocab_size
    fingerprint = "byte-v1"

    def sentinel_id(self, i: int) -> int:
        return self.vocab_size + 1 + i

    def special_ids(self) -> list[int]:
        """Ids of the special tokens a text can contain (never masked or noised)."""
        return [self.pad_id, self.bos_id, self.eos_id]

    def encode(self, text: str | bytes) -> np.ndarray:
        """Token ids (int32) of the UTF-8 bytes; no bos/eos is added."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32) + NUM_SPECIAL

    def encode_batch(self, docs) -> list[np.ndarray]:
        return [self.encode(d) for d in docs]

    def decode(self, ids) -> str:
        """Text of the byte ids; special and out-of-range ids (a larger model vocab) are dropped."""
        ids_N = np.asarray(ids, dtype=np.int64).reshape(-1)
        ids_N = ids_N[(ids_N >= NUM_SPECIAL) & (ids_N < self.vocab_size)]
        return (ids_N - NUM_SPECIAL).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"


def _file_fingerprint(path: Path, kind: str) -> str:
    return kind + "-" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]


class _NamedTokens:
    """mask_id and sentinel_id(i) of a tokenizer file, by looking the tokens up (`token_id`)."""

    def token_id(self, token: str) -> int | None:
        raise NotImplementedError

    @property
    def mask_id(self) -> int:
        found = [i for i in map(self.token_id, MASK_NAMES) if i is not None]
        if not found:
            raise ConfigError(f"{self.path}: the {self.name} tokenizer has no mask token "
                              f"(looked for {' and '.join(MASK_NAMES)}); the mlm objective needs "
                              f"one: add it to the tokenizer")
        return found[0]

    def sentinel_id(self, i: int) -> int:
        found = self.token_id(SENTINEL.format(i))
        if found is None:
            raise ConfigError(f"{self.path}: the {self.name} tokenizer has no sentinel token "
                              f"{SENTINEL.format(i)}; the seq2seq objective needs "
                              f"{SENTINEL.format(0)} .. {SENTINEL.format(i)} at least: add them "
                              f"to the tokenizer")
        return found

    def _named_specials(self) -> list[int]:
        """The mask and sentinel tokens this file has (they never count as regular text)."""
        ids = [self.token_id(n) for n in MASK_NAMES]
        i = 0
        while (sentinel := self.token_id(SENTINEL.format(i))) is not None:
            ids.append(sentinel)
            i += 1
        return [t for t in ids if t is not None]


class SentencePieceTokenizer(_NamedTokens):
    """A SentencePiece `.model`; encodes batches on all cores (the C++ side drops the GIL)."""

    name = "sentencepiece"

    def __init__(self, path: str | Path):
        import sentencepiece as spm
        self.path = Path(path)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(model_proto=self.path.read_bytes())
        except Exception as e:  # noqa: BLE001 (sentencepiece raises RuntimeError/OSError/...)
            raise ConfigError(f"{path}: not a SentencePiece model ({str(e).splitlines()[0]})"
                              ) from None
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id, self.bos_id = self._sp.eos_id(), self._sp.bos_id()
        if self.eos_id < 0:
            raise ConfigError(f"{path}: the SentencePiece model has no eos piece (trained with "
                              f"eos_id=-1); documents need one to be packed")
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
        self.fingerprint = _file_fingerprint(self.path, "spm")

    def encode(self, text: str | bytes) -> np.ndarray:
        return np.asarray(self._sp.encode(_text(text)), dtype=np.int32)

    def encode_batch(self, docs) -> list[np.ndarray]:
        ids = self._sp.encode([_text(d) for d in docs], num_threads=_threads())
        return [np.asarray(x, dtype=np.int32) for x in ids]

    def decode(self, ids) -> str:
        ids_N = np.asarray(ids, dtype=np.int64).reshape(-1)
        return self._sp.decode([int(i) for i in ids_N if 0 <= i < self.vocab_size])

    def token_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)  # an unknown piece maps to unk: check it round-trips
        return i if self._sp.id_to_piece(i) == token else None

    def special_ids(self) -> list[int]:
        """Control pieces (pad, bos, eos) plus the mask and sentinel pieces the model has."""
        control = [i for i in range(self.vocab_size) if self._sp.is_control(i)]
        return sorted(set(control + [self.pad_id, self.eos_id] + self._named_specials()))

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.path}, vocab_size={self.vocab_size})"


class HuggingFaceTokenizer(_NamedTokens):
    """A Hugging Face `tokenizer.json` (the `tokenizers` library; no transformers needed).

    The eos token comes from a `tokenizer_config.json` beside the file, else the first of
    EOS_NAMES in the vocabulary.
    """

    name = "huggingface"

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"{path}: tokenizer file not found")
        try:
            self._tok = Tokenizer.from_file(str(self.path))
        except Exception as e:  # noqa: BLE001 (the Rust side raises a bare Exception)
            raise ConfigError(f"{path}: not a Hugging Face tokenizer.json "
                              f"({str(e).splitlines()[0]})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        names = list(EOS_NAMES)
        config = self.path.with_name("tokenizer_config.json")
        if config.is_file():
            try:
                eos = json.loads(config.read_text()).get("eos_token")
            except (ValueError, OSError) as e:
                raise ConfigError(f"{config}: cannot read ({e})") from None
            eos = eos.get("content") if isinstance(eos, dict) else eos
            names = [eos] if eos else names
        found = [vocab[n] for n in names if n in vocab]
        if not found:
            raise ConfigError(f"{path}: no end-of-document token found (looked for "
                              f"{', '.join(names)}); add one, or a tokenizer_config.json with "
                              f"eos_token")
        self.eos_id = found[0]
        self.bos_id = vocab.get("<s>", vocab.get("<|begin_of_text|>", self.eos_id))
        self.pad_id = vocab.get("<pad>", self.eos_id)
        self.fingerprint = _file_fingerprint(self.path, "hf")

    def encode(self, text: str | bytes) -> np.ndarray:
        return np.asarray(self._tok.encode(_text(text), add_special_tokens=False).ids, np.int32)

    def encode_batch(self, docs) -> list[np.ndarray]:
        out = self._tok.encode_batch([_text(d) for d in docs], add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in out]

    def decode(self, ids) -> str:
        ids_N = np.asarray(ids, dtype=np.int64).reshape(-1)
        return self._tok.decode([int(i) for i in ids_N if 0 <= i < self.vocab_size])

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def special_ids(self) -> list[int]:
        """The added tokens marked special, pad and eos, and the mask and sentinel tokens."""
        added = [i for i, t in self._tok.get_added_tokens_decoder().items() if t.special]
        return sorted(set(added + [self.pad_id, self.eos_id] + self._named_specials()))

    def __repr__(self) -> str:
        return f"HuggingFaceTokenizer({self.path}, vocab_size={self.vocab_size})"


def load_tokenizer(kind: str, path: str | None = None):
    """The configured tokenizer (`data.tokenizer`, `data.tokenizer_path`)."""
    if kind == "byte":
        return ByteTokenizer()
    if kind not in ("sentencepiece", "huggingface"):
        raise ConfigError(f"data.tokenizer: {kind!r} is not one of: byte, sentencepiece, "
                          f"huggingface")
    if not path:
        raise ConfigError(f"data.tokenizer={kind} needs data.tokenizer_path")
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"data.tokenizer_path: {path}: tokenizer file not found")
    return SentencePieceTokenizer(p) if kind == "sentencepiece" else HuggingFaceTokenizer(p)


def check_vocab(tokenizer, vocab_size: int) -> None:
    """The model must have an embedding row for every id the tokenizer can produce."""
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"model.vocab_size={vocab_size} is smaller than the {tokenizer.name} "
                          f"tokenizer's vocabulary ({tokenizer.vocab_size}); set "
                          f"model.vocab_size >= {tokenizer.vocab_size}")
