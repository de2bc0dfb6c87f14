"""tensorflow-datasets as a document source, and local corpora turned into tfds datasets.

The default path reads array_record shards through `as_data_source` (random access, no
TensorFlow). A dataset prepared only as TFRecord is read through tf.data when TensorFlow is
installed. Nothing here downloads: a dataset that is not prepared is an error saying how to
prepare it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np

from jaxlm.config import ConfigError
from jaxlm.data.files import fingerprint as files_fingerprint
from jaxlm.data.files import read_documents

READ_BATCH = 1024  # records per random-access read


def _tfds():
    import tensorflow_datasets as tfds
    return tfds


def open_builder(name: str, data_dir: str | None):
    """The dataset's builder (registered code, or read-only from prepared files)."""
    tfds = _tfds()
    try:
        return tfds.builder(name, data_dir=os.path.expanduser(data_dir) if data_dir else None)
    except tfds.core.registered.DatasetNotFoundError:
        where = data_dir or "the default tfds data_dir"
        raise ConfigError(f"data.tfds_name={name}: no registered tfds dataset of that name and "
                          f"none prepared under {where} (data.tfds_data_dir)") from None
    except ValueError as e:
        raise ConfigError(f"data.tfds_name={name}: {str(e).splitlines()[0]}") from None


def _not_prepared(builder, name: str) -> ConfigError:
    root = Path(str(builder.data_dir)).parents[1 if builder.builder_config else 0].parent
    return ConfigError(
        f"data.tfds_name={name}: not prepared under {builder.data_dir}; jaxlm never downloads "
        f"at run time. Prepare it once where there is network: `tfds build {name} "
        f"--data_dir={root} --file_format=array_record` (then copy that folder here and set "
        f"data.tfds_data_dir)")


def _field(record, field: str, where: str):
    value = record
    for part in field.split("/"):
        if not isinstance(value, dict) or part not in value:
            have = ", ".join(sorted(value)) if isinstance(value, dict) else type(value).__name__
            raise ConfigError(f"{where}: no feature {field!r} (data.text_field); features: {have}")
        value = value[part]
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if not isinstance(value, (bytes, str)):
        raise ConfigError(f"{where}: feature {field!r} is {type(value).__name__}, not text")
    return value


def _leaves(record) -> list:
    return [v for x in record.values() for v in _leaves(x)] if isinstance(record, dict) \
        else [record]


def _shard_of(builder, split: str, index: int) -> str:
    """The shard file holding record `index` of an unsliced split (for error messages)."""
    try:
        info = builder.info.splits[split]
        ends = np.cumsum(info.shard_lengths)
        return str(info.filepaths[int(np.searchsorted(ends, index, side="right"))])
    except Exception:  # noqa: BLE001 (sliced split, mocked info: fall back to the folder)
        return str(builder.data_dir)


def _from_data_source(builder, source, split: str, field: str, name: str, key_field
                      ) -> Iterator[tuple[str, bytes | str]]:
    for start in range(0, len(source), READ_BATCH):
        ids = list(range(start, min(start + READ_BATCH, len(source))))
        try:
            try:
                records = source.__getitems__(ids)
            except TypeError:  # tfds.testing.mock_data mocks only __getitem__ correctly
                records = [source[i] for i in ids]
        except Exception as e:  # noqa: BLE001 (array_record raises RuntimeError on corruption)
            raise ConfigError(f"{_shard_of(builder, split, start)}: cannot read records "
                              f"{ids[0]}-{ids[-1]} of {name} {split} "
                              f"({str(e).splitlines()[0]}); the shard is corrupted: prepare the "
                              f"dataset again") from None
        for i, record in zip(ids, records):
            where = f"{name} {split} record {i}"
            if record is None or None in _leaves(record):  # what a truncated shard reads as
                raise ConfigError(f"{_shard_of(builder, split, i)}: record {i} of {name} "
                                  f"{split} is empty; the shard is truncated or corrupted: "
                                  f"prepare the dataset again")
            key = _field(record, key_field, where) if key_field else str(i)
            yield (key.decode() if isinstance(key, bytes) else key), _field(record, field, where)


def _from_tf_data(builder, split: str, field: str, name: str
                  ) -> Iterator[tuple[str, bytes | str]]:
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        raise ConfigError(f"data.tfds_name={name}: prepared as TFRecord at {builder.data_dir}, "
                          f"which needs TensorFlow to read; install tensorflow, or prepare it "
                          f"again with --file_format=array_record") from None
    tfds = _tfds()
    ds = builder.as_dataset(split=split, shuffle_files=False)
    for i, record in enumerate(tfds.as_numpy(ds)):
        yield str(i), _field(record, field, f"{name} {split} record {i}")


def iter_documents(builder, name: str, split: str, field: str, key_field: str | None = None
                   ) -> Iterator[tuple[str, bytes | str]]:
    """(key, text) of a split in its stored order; the key is `key_field`'s value, else the
    record index."""
    try:
        source = builder.as_data_source(split=split)
    except (KeyError, AssertionError):
        raise _not_prepared(builder, name) from None
    except ValueError as e:
        raise ConfigError(f"data.tfds_split/tfds_eval_split={split!r} of {name}: "
                          f"{str(e).splitlines()[0]}") from None
    except NotImplementedError:  # prepared, but not in a random-access format
        if not builder.is_prepared():
            raise _not_prepared(builder, name) from None
        return _from_tf_data(builder, split, field, name)
    return _from_data_source(builder, source, split, field, name, key_field)


def fingerprint(builder, parts: list[str]) -> str:
    """Dataset folder + its files' sizes and times + the given settings."""
    digest = hashlib.sha256("\0".join([str(builder.data_dir)] + parts).encode())
    folder = Path(str(builder.data_dir))
    for f in sorted(folder.iterdir()) if folder.is_dir() else []:
        st = f.stat()
        digest.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- local corpora as tfds datasets

def _local_builder_class():
    """Defined on first use so importing jaxlm.data does not import tfds."""
    global _LocalText
    if _LocalText is not None:
        return _LocalText
    tfds = _tfds()

    @dataclasses.dataclass(eq=False)
    class LocalTextConfig(tfds.core.BuilderConfig):
        files: tuple = ()
        text_field: str = "text"

    class JaxlmLocalText(tfds.core.GeneratorBasedBuilder):
        """Documents of local .txt/.jsonl/.parquet files with a stable key each."""
        VERSION = tfds.core.Version("1.0.0")
        BUILDER_CONFIG_CLASS = LocalTextConfig

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"key": tfds.features.Text(), "text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            cfg = self.builder_config
            for key, text in read_documents([Path(f) for f in cfg.files], cfg.text_field):
                yield key, {"key": key, "text": text}

    _LocalText = (JaxlmLocalText, LocalTextConfig)
    return _LocalText


_LocalText = None


def local_corpus(files: list[Path], text_field: str, cache_dir: Path):
    """The files as a prepared array_record tfds dataset under cache_dir/corpora/<fingerprint>,
    built once (in a temporary folder renamed when complete) and reused after."""
    final = cache_dir / "corpora" / files_fingerprint(files, text_field)
    version_dir = final / "jaxlm_local_text" / "corpus" / "1.0.0"
    if not version_dir.is_dir():
        builder_cls, config_cls = _local_builder_class()
        tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            builder = builder_cls(data_dir=str(tmp), file_format="array_record",
                                  config=config_cls(name="corpus", files=tuple(map(str, files)),
                                                    text_field=text_field))
            builder.download_and_prepare(download_dir=str(tmp / "downloads"))
            shutil.rmtree(tmp / "downloads", ignore_errors=True)
            try:
                tmp.rename(final)
            except OSError:  # another process finished first: use its copy
                if not version_dir.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _tfds().builder_from_directory(str(version_dir))
