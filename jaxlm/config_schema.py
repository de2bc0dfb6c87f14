"""The run configuration's schema: one small dataclass per subsystem, with the ranges and
choices each field accepts (read by `jaxlm.config`, which loads, validates and reports). The
`model` section is the chosen family's own dataclass (jaxlm/models/<family>/config.py)."""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field

from jaxlm.config_fields import ConfigError, bounds, choices, coerce
from jaxlm.models.config import ModelConfig
from jaxlm.models.registry import family

DEFAULT_FAMILY = "llama"

MESH_AXES = ("data", "stage", "fsdp", "sequence", "expert", "tensor")

# Logical name -> mesh axes. First match wins; an axis already used by an earlier dimension of the
# same array, or of size 1, is skipped. Params use bare names, activations the `act_` names:
# `act_res_seq` is the sequence dim of the residual stream and norms (between tensor-parallel
# regions: Megatron sequence parallelism maps it to `tensor` too), `act_seq` the sequence dim
# inside attention/MLP (context parallelism over `sequence`).
DEFAULT_RULES = [
    ["batch", ["data", "fsdp", "expert"]],
    ["act_batch", ["data", "fsdp", "expert"]],
    ["act_res_seq", "sequence"],
    ["act_seq", "sequence"],
    ["act_embed", None],
    ["act_heads", "tensor"],
    ["act_kv_heads", "tensor"],
    ["act_mlp", "tensor"],
    ["act_vocab", "tensor"],
    ["layers", "stage"],
    # with expert parallelism the expert axis also splits the non-expert params (it holds
    # different tokens, like fsdp); expert weights take `expert` on their expert dim first
    ["expert", "expert"],
    ["embed", ["fsdp", "expert"]],
    ["lora", ["fsdp", "expert"]],  # MLA's low-rank latent dims: split like embed where free
    ["vocab", "tensor"],
    ["heads", "tensor"],
    ["kv_heads", "tensor"],
    ["mlp", "tensor"],
    ["head_dim", None],
    ["norm", None],
]


@dataclass
class DcnConfig:
    """How much of each mesh axis spans slices/hosts over the slower data-centre network (DCN).
    The rest of the axis stays inside a slice (ICI/NVLink), so bandwidth-hungry axes (tensor,
    fsdp) should stay 1 here and data parallelism go across."""
    data: int = field(default=1, metadata=bounds(1))
    stage: int = field(default=1, metadata=bounds(1))
    fsdp: int = field(default=1, metadata=bounds(1))
    sequence: int = field(default=1, metadata=bounds(1))
    expert: int = field(default=1, metadata=bounds(1))
    tensor: int = field(default=1, metadata=bounds(1))

    def num_slices(self) -> int:
        return math.prod(getattr(self, a) for a in MESH_AXES)


@dataclass
class MeshConfig:
    """Sizes of the device mesh axes (-1 on one axis: fill with the remaining devices)."""
    data: int = field(default=-1, metadata=bounds(-1))
    stage: int = field(default=1, metadata=bounds(-1))
    fsdp: int = field(default=1, metadata=bounds(-1))
    sequence: int = field(default=1, metadata=bounds(-1))
    expert: int = field(default=1, metadata=bounds(-1))
    tensor: int = field(default=1, metadata=bounds(-1))
    rules: list = field(default_factory=lambda: [list(r) for r in DEFAULT_RULES])
    dcn: DcnConfig = field(default_factory=DcnConfig)
    zero1: bool = False  # shard optimizer state over `data` too (params stay replicated there)
    # with sequence > 1, how attention reads the other devices' keys and values: passed around
    # a ring (jaxlm.parallel.ring; no device holds the whole sequence's K/V) or all-gathered
    context_parallel: str = field(default="ring", metadata=choices("ring", "all_gather"))
    # refuse meshes whose per-device parameter bytes exceed the ideal (total / sharding axes) by
    # more than this fraction: a rules table that silently replicates a big tensor is a bug
    max_unsharded_fraction: float = field(default=0.05, metadata=bounds(0.0))

    def axis_sizes(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in MESH_AXES}


@dataclass
class PipelineConfig:
    """Pipeline parallelism over mesh.stage (jaxlm/pipeline.py); inert while mesh.stage is 1.
    Each batch (after train.microbatches' accumulation split) is cut into `microbatches`."""
    # gpipe: all forwards then all backwards; circular: virtual_stages layer groups per device
    # (smaller bubble); 1f1b: interleaved forward/backward, activation memory bounded by stages
    schedule: str = field(default="gpipe", metadata=choices("gpipe", "circular", "1f1b"))
    microbatches: int = field(default=1, metadata=bounds(1))
    virtual_stages: int = field(default=1, metadata=bounds(1))  # circular only


@dataclass
class DataConfig:
    # files: `path` is a folder, file or glob of .txt/.jsonl/.parquet; tokens: `path` is a flat
    # .bin (token_dtype) or .npy of token ids; mixture: rows drawn by weight from `mixture` entries
    source: str = field(default="stdlib", metadata=choices(
        "stdlib", "synthetic", "files", "tfds", "tokens", "mixture"))
    seq_len: int = field(default=256, metadata=bounds(2))
    max_bytes: int = field(default=8_000_000, metadata=bounds(1024))  # stdlib only
    eval_fraction: float = field(default=0.02, metadata=bounds(0.0, 0.5))
    seed: int = 0
    path: str | None = None
    text_field: str = "text"  # jsonl/parquet field or tfds feature ("a/b" for nested features)
    tfds_name: str | None = None  # a registered or prepared dataset, e.g. "my_ds/config:1.0.0"
    tfds_split: str = "train"
    tfds_eval_split: str | None = None  # None: hold out eval_fraction of tfds_split's documents
    tfds_data_dir: str | None = None  # None: tfds's default ($TFDS_DATA_DIR, ~/tensorflow_datasets)
    token_dtype: str = field(default="uint16", metadata=choices("uint16", "uint32"))  # .bin files
    tokenizer: str = field(default="byte", metadata=choices("byte", "sentencepiece", "huggingface"))
    tokenizer_path: str | None = None  # sentencepiece .model or huggingface tokenizer.json
    cache_dir: str = "~/.cache/jaxlm/data"  # local corpora as tfds datasets, tokenized arrays
    mixture: list = field(default_factory=list)  # [{source: files, path: ..., weight: 0.7}, ...]
    prefetch: int = field(default=2, metadata=bounds(0))  # batches read ahead on a thread
    # masked LM (model objective mlm): the share of regular tokens selected for prediction
    mlm_probability: float = field(default=0.15, metadata=bounds(0.0, 1.0, exclusive=True))
    # span corruption (objective seq2seq, T5): the share of a piece's tokens that is noise, the
    # mean noise span length, and the decoder length (0: that of a full-length piece)
    noise_density: float = field(default=0.15, metadata=bounds(0.0, 1.0, exclusive=True))
    mean_noise_span_length: float = field(default=3.0, metadata=bounds(1.0))
    target_len: int = field(default=0, metadata=bounds(0))

    def sources(self) -> list[tuple[DataConfig, float]]:
        """(config, weight) of each source: this config alone, or each mixture entry merged onto
        it (an entry sets source keys; seq_len, seed and the tokenizer are shared)."""
        if self.source != "mixture":
            return [(self, 1.0)]
        hints = typing.get_type_hints(DataConfig)
        out = []
        for i, entry in enumerate(self.mixture):
            where = f"data.mixture[{i}]"
            if not isinstance(entry, dict) or "source" not in entry:
                raise ConfigError(f"{where}: expected a mapping with at least 'source' and "
                                  f"'weight', got {entry!r}")
            values = {}
            for key, value in entry.items():
                if key not in MIXTURE_KEYS:
                    close = difflib.get_close_matches(str(key), MIXTURE_KEYS, n=1)
                    hint = f" (did you mean '{close[0]}'?)" if close else ""
                    raise ConfigError(f"{where}: key '{key}' cannot be set per source{hint}; "
                                      f"allowed: {', '.join(MIXTURE_KEYS)}")
                values[key] = coerce(value, float if key == "weight" else hints[key],
                                      f"{where}.{key}", "config")
            weight = values.pop("weight", None)
            if weight is None or not math.isfinite(weight) or weight <= 0:
                raise ConfigError(f"{where}.weight: expected a number > 0, got {weight!r}")
            out.append((dataclasses.replace(self, mixture=[], **values), weight))
        return out


# Keys a mixture entry may set; the rest (seq_len, seed, tokenizer, cache...) are shared.
MIXTURE_KEYS = ("source", "weight", "path", "text_field", "tfds_name", "tfds_split",
                "tfds_eval_split", "tfds_data_dir", "token_dtype", "max_bytes", "eval_fraction")


@dataclass
class OptimConfig:
    lr: float = field(default=3e-4, metadata=bounds(0.0))
    schedule: str = field(default="cosine", metadata=choices("cosine", "linear", "constant"))
    warmup_steps: int = field(default=100, metadata=bounds(0))
    min_lr_ratio: float = field(default=0.1, metadata=bounds(0.0, 1.0))
    b1: float = field(default=0.9, metadata=bounds(0.0, 1.0))
    b2: float = field(default=0.95, metadata=bounds(0.0, 1.0))
    eps: float = field(default=1e-8, metadata=bounds(0.0))
    weight_decay: float = field(default=0.1, metadata=bounds(0.0))
    clip_norm: float = field(default=1.0, metadata=bounds(0.0))  # 0 disables clipping


@dataclass
class TrainConfig:
    steps: int = field(default=1000, metadata=bounds(1))
    global_batch_size: int = field(default=16, metadata=bounds(1))
    microbatches: int = field(default=1, metadata=bounds(1))  # gradient accumulation
    seed: int = 0
    eval_every: int = field(default=200, metadata=bounds(0))  # 0: only at the end
    eval_batches: int = field(default=4, metadata=bounds(1))
    run_dir: str = "runs/default"
    # a step whose loss, gradients or updated parameters are not finite: `stop` ends the run
    # (exit code 3; the last checkpoint stays the latest), `skip` keeps the parameters and
    # optimizer state of before a step with a non-finite loss or gradients and goes on, up to
    # max_skipped_steps in a row (non-finite parameters from finite gradients always stop)
    on_nonfinite: str = field(default="stop", metadata=choices("stop", "skip"))
    max_skipped_steps: int = field(default=10, metadata=bounds(1))


@dataclass
class CheckpointConfig:
    enabled: bool = True
    every_steps: int = field(default=500, metadata=bounds(1))
    keep: int = field(default=3, metadata=bounds(1))
    async_save: bool = True
    resume: bool = True


@dataclass
class LogConfig:
    every_steps: int = field(default=10, metadata=bounds(1))
    jsonl: bool = True
    tensorboard: bool = True
    progress: bool = True
    peak_tflops: float | None = field(default=None, metadata=bounds(0.0))  # per device; None: table


@dataclass
class RuntimeConfig:
    cpu_devices: int = field(default=0, metadata=bounds(0))  # simulated CPU devices; 0: leave as is
    compilation_cache: str | None = None


@dataclass
class DistributedConfig:
    """Multi-process runs through jax.distributed (see jaxlm/distributed.py). Unset values come
    from JAXLM_COORDINATOR/JAXLM_NUM_PROCESSES/JAXLM_PROCESS_ID, then from SLURM or a Kubernetes
    Indexed Job; with none of those the run is one process."""
    # auto: as above; jax: JAX's own detection too (Cloud TPU VMs, Open MPI); off: one process
    detect: str = field(default="auto", metadata=choices("auto", "jax", "off"))
    coordinator: str | None = None  # host:port of process 0
    coordinator_port: int = field(default=0, metadata=bounds(0, 65535))  # 0: SLURM job id / 1234
    num_processes: int = field(default=0, metadata=bounds(0))  # 0: from the environment
    process_id: int = field(default=-1, metadata=bounds(-1))  # -1: from the environment
    init_timeout_s: int = field(default=300, metadata=bounds(1))  # all processes must join by then
    heartbeat_timeout_s: int = field(default=100, metadata=bounds(1))  # a silent peer is dead after
    shutdown_timeout_s: int = field(default=300, metadata=bounds(1))  # wait for peers at exit


@dataclass
class Config:
    # the class of the family `model.family` names (jaxlm.config picks it while loading)
    model: ModelConfig = field(default_factory=lambda: family(DEFAULT_FAMILY).config())
    mesh: MeshConfig = field(default_factory=MeshConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
