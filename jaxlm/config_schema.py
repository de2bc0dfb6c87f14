"""The run configuration's schema: one small dataclass per subsystem, with the ranges and
choices each field accepts (read by `jaxlm.config`, which loads, validates and reports)."""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field

class ConfigError(ValueError):
    """Bad user input: the message names the key or file and what was expected."""


def _choices(*values):
    return {"choices": values}


def _range(lo=None, hi=None):
    return {"min": lo, "max": hi}


@dataclass
class ModelConfig:
    family: str = field(default="llama", metadata=_choices("llama"))
    vocab_size: int = field(default=512, metadata=_range(1))
    d_model: int = field(default=256, metadata=_range(1))
    num_layers: int = field(default=4, metadata=_range(1))
    num_heads: int = field(default=4, metadata=_range(1))
    num_kv_heads: int = field(default=4, metadata=_range(1))
    head_dim: int = field(default=0, metadata=_range(0))  # 0: d_model // num_heads
    ffn_dim: int = field(default=768, metadata=_range(1))
    rope_theta: float = field(default=10000.0, metadata=_range(1.0))
    norm_eps: float = field(default=1e-6, metadata=_range(0.0))
    tie_embeddings: bool = False
    init_std: float = field(default=0.02, metadata=_range(0.0))
    param_dtype: str = field(default="float32", metadata=_choices("float32", "bfloat16"))
    dtype: str = field(default="float32", metadata=_choices("float32", "bfloat16", "float16"))
    attention: str = field(default="xla", metadata=_choices("xla", "cudnn", "pallas", "auto"))
    scan_layers: bool = True
    # with scan_layers: layers per scan iteration (num_layers = fully unrolled; parameters stay
    # stacked either way, so checkpoints and the 'layers' axis do not change)
    scan_unroll: int = field(default=1, metadata=_range(1))
    remat: str = field(default="none", metadata=_choices("none", "full", "save_dots"))
    # Mixture of Experts (jaxlm/models/moe.py); num_experts 0 = dense. Every moe_every-th layer is
    # MoE (the scanned unit is then a group of moe_every layers, the last one MoE).
    num_experts: int = field(default=0, metadata=_range(0))
    experts_per_token: int = field(default=2, metadata=_range(1))  # top-k
    moe_every: int = field(default=1, metadata=_range(1))
    num_shared_experts: int = field(default=0, metadata=_range(0))
    expert_ffn_dim: int = field(default=0, metadata=_range(0))  # 0: ffn_dim
    router: str = field(default="softmax", metadata=_choices("softmax", "sigmoid"))
    dispatch: str = field(default="dropless", metadata=_choices("dropless", "capacity"))
    capacity_factor: float = field(default=1.25, metadata=_range(0.0))  # dispatch=capacity only
    aux_loss_weight: float = field(default=0.01, metadata=_range(0.0))  # load balancing
    z_loss_weight: float = field(default=0.001, metadata=_range(0.0))  # router z-loss

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads


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
    data: int = field(default=1, metadata=_range(1))
    stage: int = field(default=1, metadata=_range(1))
    fsdp: int = field(default=1, metadata=_range(1))
    sequence: int = field(default=1, metadata=_range(1))
    expert: int = field(default=1, metadata=_range(1))
    tensor: int = field(default=1, metadata=_range(1))

    def num_slices(self) -> int:
        return math.prod(getattr(self, a) for a in MESH_AXES)


@dataclass
class MeshConfig:
    """Sizes of the device mesh axes (-1 on one axis: fill with the remaining devices)."""
    data: int = field(default=-1, metadata=_range(-1))
    stage: int = field(default=1, metadata=_range(-1))
    fsdp: int = field(default=1, metadata=_range(-1))
    sequence: int = field(default=1, metadata=_range(-1))
    expert: int = field(default=1, metadata=_range(-1))
    tensor: int = field(default=1, metadata=_range(-1))
    rules: list = field(default_factory=lambda: [list(r) for r in DEFAULT_RULES])
    dcn: DcnConfig = field(default_factory=DcnConfig)
    zero1: bool = False  # shard optimizer state over `data` too (params stay replicated there)
    # refuse meshes whose per-device parameter bytes exceed the ideal (total / sharding axes) by
    # more than this fraction: a rules table that silently replicates a big tensor is a bug
    max_unsharded_fraction: float = field(default=0.05, metadata=_range(0.0))

    def axis_sizes(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in MESH_AXES}


@dataclass
class PipelineConfig:
    """Pipeline parallelism over mesh.stage (jaxlm/pipeline.py); inert while mesh.stage is 1.
    Each batch (after train.microbatches' accumulation split) is cut into `microbatches`."""
    # gpipe: all forwards then all backwards; circular: virtual_stages layer groups per device
    # (smaller bubble); 1f1b: interleaved forward/backward, activation memory bounded by stages
    schedule: str = field(default="gpipe", metadata=_choices("gpipe", "circular", "1f1b"))
    microbatches: int = field(default=1, metadata=_range(1))
    virtual_stages: int = field(default=1, metadata=_range(1))  # circular only


@dataclass
class DataConfig:
    # files: `path` is a folder, file or glob of .txt/.jsonl/.parquet; tokens: `path` is a flat
    # .bin (token_dtype) or .npy of token ids; mixture: rows drawn by weight from `mixture` entries
    source: str = field(default="stdlib", metadata=_choices(
        "stdlib", "synthetic", "files", "tfds", "tokens", "mixture"))
    seq_len: int = field(default=256, metadata=_range(2))
    max_bytes: int = field(default=8_000_000, metadata=_range(1024))  # stdlib only
    eval_fraction: float = field(default=0.02, metadata=_range(0.0, 0.5))
    seed: int = 0
    path: str | None = None
    text_field: str = "text"  # jsonl/parquet field or tfds feature ("a/b" for nested features)
    tfds_name: str | None = None  # a registered or prepared dataset, e.g. "my_ds/config:1.0.0"
    tfds_split: str = "train"
    tfds_eval_split: str | None = None  # None: hold out eval_fraction of tfds_split's documents
    tfds_data_dir: str | None = None  # None: tfds's default ($TFDS_DATA_DIR, ~/tensorflow_datasets)
    token_dtype: str = field(default="uint16", metadata=_choices("uint16", "uint32"))  # .bin files
    tokenizer: str = field(default="byte", metadata=_choices("byte", "sentencepiece", "huggingface"))
    tokenizer_path: str | None = None  # sentencepiece .model or huggingface tokenizer.json
    cache_dir: str = "~/.cache/jaxlm/data"  # local corpora as tfds datasets, tokenized arrays
    mixture: list = field(default_factory=list)  # [{source: files, path: ..., weight: 0.7}, ...]
    prefetch: int = field(default=2, metadata=_range(0))  # batches read ahead on a thread

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
                from jaxlm.config import _coerce  # the loader's type rules, shared
                values[key] = _coerce(value, float if key == "weight" else hints[key],
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
    lr: float = field(default=3e-4, metadata=_range(0.0))
    schedule: str = field(default="cosine", metadata=_choices("cosine", "linear", "constant"))
    warmup_steps: int = field(default=100, metadata=_range(0))
    min_lr_ratio: float = field(default=0.1, metadata=_range(0.0, 1.0))
    b1: float = field(default=0.9, metadata=_range(0.0, 1.0))
    b2: float = field(default=0.95, metadata=_range(0.0, 1.0))
    eps: float = field(default=1e-8, metadata=_range(0.0))
    weight_decay: float = field(default=0.1, metadata=_range(0.0))
    clip_norm: float = field(default=1.0, metadata=_range(0.0))  # 0 disables clipping


@dataclass
class TrainConfig:
    steps: int = field(default=1000, metadata=_range(1))
    global_batch_size: int = field(default=16, metadata=_range(1))
    microbatches: int = field(default=1, metadata=_range(1))  # gradient accumulation
    seed: int = 0
    eval_every: int = field(default=200, metadata=_range(0))  # 0: only at the end
    eval_batches: int = field(default=4, metadata=_range(1))
    run_dir: str = "runs/default"
    # a step whose loss, gradients or updated parameters are not finite: `stop` ends the run
    # (exit code 3; the last checkpoint stays the latest), `skip` keeps the parameters and
    # optimizer state of before that step and goes on, up to max_skipped_steps in a row
    on_nonfinite: str = field(default="stop", metadata=_choices("stop", "skip"))
    max_skipped_steps: int = field(default=10, metadata=_range(1))


@dataclass
class CheckpointConfig:
    enabled: bool = True
    every_steps: int = field(default=500, metadata=_range(1))
    keep: int = field(default=3, metadata=_range(1))
    async_save: bool = True
    resume: bool = True


@dataclass
class LogConfig:
    every_steps: int = field(default=10, metadata=_range(1))
    jsonl: bool = True
    tensorboard: bool = True
    progress: bool = True
    peak_tflops: float | None = field(default=None, metadata=_range(0.0))  # per device; None: table


@dataclass
class RuntimeConfig:
    cpu_devices: int = field(default=0, metadata=_range(0))  # simulated CPU devices; 0: leave as is
    compilation_cache: str | None = None


@dataclass
class DistributedConfig:
    """Multi-process runs through jax.distributed (see jaxlm/distributed.py). Unset values come
    from JAXLM_COORDINATOR/JAXLM_NUM_PROCESSES/JAXLM_PROCESS_ID, then from SLURM or a Kubernetes
    Indexed Job; with none of those the run is one process."""
    # auto: as above; jax: JAX's own detection too (Cloud TPU VMs, Open MPI); off: one process
    detect: str = field(default="auto", metadata=_choices("auto", "jax", "off"))
    coordinator: str | None = None  # host:port of process 0
    coordinator_port: int = field(default=0, metadata=_range(0, 65535))  # 0: SLURM job id / 1234
    num_processes: int = field(default=0, metadata=_range(0))  # 0: from the environment
    process_id: int = field(default=-1, metadata=_range(-1))  # -1: from the environment
    init_timeout_s: int = field(default=300, metadata=_range(1))  # all processes must join by then
    heartbeat_timeout_s: int = field(default=100, metadata=_range(1))  # a silent peer is dead after
    shutdown_timeout_s: int = field(default=300, metadata=_range(1))  # wait for peers at exit


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
