"""Local corpora: find .txt / .jsonl / .parquet files and read their documents.

A .txt file is one document, a .jsonl line one document (its `text_field`), a parquet row one
document (its `text_field` column). Every problem names the file, and the line for JSONL, so a
bad record in a 100 GB corpus can be found and fixed.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

from jaxlm.config import ConfigError

SUFFIXES = (".txt", ".jsonl", ".parquet")


def list_files(pattern: str) -> list[Path]:
    """Sorted corpus files of a folder (recursively), a single file, or a glob."""
    p = Path(pattern).expanduser()
    if p.is_dir():
        found = [f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES]
    elif p.is_file():
        found = [p]
    else:
        found = [Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file()]
    if not found:
        raise ConfigError(f"data.path: {pattern}: no such file, folder or glob match")
    bad = [f for f in found if f.suffix not in SUFFIXES]
    if bad:
        raise ConfigError(f"data.path: {bad[0]}: unsupported file type '{bad[0].suffix}'; "
                          f"expected {', '.join(SUFFIXES)}")
    return sorted(f.absolute() for f in found)


def fingerprint(files: list[Path], text_field: str) -> str:
    """Changes when a file is added, removed, resized or touched, or the field changes;
    cheap (stat only) so a cached corpus starts instantly."""
    digest = hashlib.sha256(f"field={text_field}\n".encode())
    for f in files:
        st = f.stat()
        digest.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _decode(data: bytes, path: Path, line: int | None = None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = line or data.count(b"\n", 0, e.start) + 1
        where = f"{path}:{line}"
        raise ConfigError(f"{where}: not valid UTF-8 (byte {e.start})") from None


def _read_txt(path: Path) -> Iterator[tuple[str, str]]:
    yield path.name, _decode(path.read_bytes(), path)


def _read_jsonl(path: Path, field: str) -> Iterator[tuple[str, str]]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(_decode(raw, path, n))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or field not in record:
                have = ", ".join(map(repr, record)) if isinstance(record, dict) else "none"
                raise ConfigError(f"{path}:{n}: no field {field!r} (data.text_field); "
                                  f"fields here: {have}")
            if not isinstance(record[field], str):
                raise ConfigError(f"{path}:{n}: field {field!r} is "
                                  f"{type(record[field]).__name__}, expected a string")
            yield f"{path.name}:{n}", record[field]


def _read_parquet(path: Path, field: str) -> Iterator[tuple[str, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
        if field not in pf.schema_arrow.names:
            raise ConfigError(f"{path}: no column {field!r} (data.text_field); columns: "
                              f"{', '.join(pf.schema_arrow.names)}")
        row = 0
        for batch in pf.iter_batches(columns=[field], batch_size=4096):
            for text in batch.column(0).to_pylist():
                row += 1
                if not isinstance(text, str):
                    raise ConfigError(f"{path}: row {row}: column {field!r} is "
                                      f"{type(text).__name__}, expected a string")
                yield f"{path.name}:{row}", text
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"{path}: cannot read parquet ({str(e).splitlines()[0]})") from None


def read_documents(files: list[Path], text_field: str = "text") -> Iterator[tuple[str, str]]:
    """(key, text) for every document, files in the given order. Keys are `name:line` and
    stable across machines, so a document's train/eval split never moves."""
    root = Path(os.path.commonpath([f.parent for f in files])) if files else Path(".")
    for path in files:
        if path.is_file() and path.stat().st_size == 0:
            raise ConfigError(f"{path}: empty file")
        rel = path.relative_to(root).parent.as_posix()
        prefix = "" if rel == "." else rel + "/"
        count = 0
        if path.suffix == ".txt":
            docs = _read_txt(path)
        elif path.suffix == ".jsonl":
            docs = _read_jsonl(path, text_field)
        else:
            docs = _read_parquet(path, text_field)
        try:
            for key, text in docs:
                count += 1
                yield prefix + key, text
        except OSError as e:
            raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
        if not count:
            raise ConfigError(f"{path}: no documents in this file")
