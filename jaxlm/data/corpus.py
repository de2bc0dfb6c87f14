"""Built-in corpus: the Python standard library's own `.py` sources.

They exist wherever Python (and so jaxlm) is installed, so a first run needs no download.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

from jaxlm.config import ConfigError

# Folders whose files are skipped: installed packages (not stable across machines), tests
# (huge, repetitive data files), and bytecode caches.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                           "__pycache__"})


@dataclass
class Corpus:
    """Documents (raw bytes) split into train/eval, with their paths relative to `root`."""
    root: str
    train: list[bytes]
    eval: list[bytes]
    train_paths: list[str]
    eval_paths: list[str]
    fingerprint: str  # changes when the set of files or their sizes change


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def list_sources(root: Path) -> list[str]:
    """Relative POSIX paths of the `.py` files under root, sorted so the order is the same
    on every machine and run."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        rel_dir = Path(dirpath).relative_to(root)
        found += [(rel_dir / f).as_posix() for f in filenames if f.endswith(".py")]
    return sorted(found)


def is_eval_path(rel_path: str, eval_fraction: float) -> bool:
    """Split by a stable hash of the path, so a file's split never depends on max_bytes."""
    return zlib.crc32(rel_path.encode("utf-8")) % 10_000 < eval_fraction * 10_000


def load_stdlib_corpus(max_bytes: int, eval_fraction: float, root: str | Path | None = None
                       ) -> Corpus:
    """Read sorted source files until `max_bytes` (the last one truncated to fit).

    Empty and unreadable files are skipped. If no file lands in eval, the last train document
    is moved there so evaluation always has data.
    """
    root = Path(root) if root is not None else stdlib_root()
    paths = list_sources(root) if root.is_dir() else []
    if not paths:
        raise ConfigError(f"data.source=stdlib: no .py files found under {root} "
                          f"(the Python standard library folder)")
    docs, kept, total = [], [], 0
    for rel in paths:
        if total >= max_bytes:
            break
        try:
            data = (root / rel).read_bytes()[: max_bytes - total]
        except OSError:
            continue
        if data:
            docs.append(data)
            kept.append(rel)
            total += len(data)
    digest = hashlib.sha256()
    for rel, data in zip(kept, docs):
        digest.update(f"{rel}\0{len(data)}\n".encode("utf-8"))
    is_eval = [is_eval_path(rel, eval_fraction) for rel in kept]
    if kept and not any(is_eval):
        is_eval[-1] = True
    pick = lambda items, want: [x for x, e in zip(items, is_eval) if e == want]  # noqa: E731
    return Corpus(root=str(root), train=pick(docs, False), eval=pick(docs, True),
                  train_paths=pick(kept, False), eval_paths=pick(kept, True),
                  fingerprint=digest.hexdigest()[:16])
