"""A trained model as decoding sees it: the training model itself (graph definition + state),
called through the model protocol with a KV cache: embed_tokens -> stack()(h, inputs, cache) ->
logits. No twin of the model: the cache goes in at the attention contract and nothing else about
decoding reaches a layer.

`LM.of(model_cfg, state, ...)` is the seam every loader feeds: a jaxlm run directory
(jaxlm.generate.load) today, a Hugging Face import later: (model config, parameter state) in,
placed on the mesh by the same logical rules training uses.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxlm.config_fields import ConfigError, check_positive_int
from jaxlm.config_schema import DEFAULT_RULES
from jaxlm.generate import cache as kv
from jaxlm.generate.quantize import cast_matmul_weights, inputs_last_state, quantize_state
from jaxlm.models.config import ModelConfig
from jaxlm.models.registry import build_model
from jaxlm.nn.param import InputsLast, Int8Weight
from jaxlm.parallel.sharding import check_divisible, mesh_axis_of, tree_shardings, use_rules

CACHE_DTYPES = ("float32", "bfloat16", "int8")  # int8: per-head scales (jaxlm.nn.kv_cache)


@dataclasses.dataclass
class LM:
    cfg: ModelConfig
    graphdef: Any
    state: Any                 # nnx pure-dict state: params (and model_state) of the model
    mesh: Mesh | None = None
    rules: Any = None
    context_len: int | None = None  # longest sequence the model may read (None: no limit)
    cache_dtype: Any = None         # None: the model's compute dtype
    decoder_start_id: int = 0       # seq2seq: the decoder's first token (pad, as span corruption)
    kv_splits: int | None = None    # decode attention's key splits (None: by the batch)
    inputs_last: bool = False       # matmul weights laid out inputs last (param.InputsLast)

    @classmethod
    def of(cls, cfg: ModelConfig, state, *, mesh: Mesh | None = None, rules=None,
           context_len: int | None = None, cache_dtype=None, decoder_start_id: int = 0,
           quantize: str | None = None, kv_splits: int | None = None,
           inputs_last: bool | None = None) -> "LM":
        """The model of `cfg` with `state` ({'params': ..., 'model_state': ...} as a train state
        holds them, or one nnx pure dict of all variables), placed on `mesh` by `rules`;
        `quantize="int8"`: its matmul weights then held as int8 (jaxlm.generate.quantize).
        `kv_splits`: programs per kv head and row in decode attention, where the paged kernel
        reads the cache (flash-decoding; for batches too small to fill a GPU); None: chosen
        from the batch and kv heads (jaxlm.nn.attend.auto_kv_splits). `inputs_last`: the
        matmul weights laid out with their input axes last (jaxlm.nn.param.InputsLast), so a
        batch of one row multiplies each as a row reduction (Engine then pads no batch); None:
        on a GPU, where batch 1 of the 1B preset went from 0.92 to 0.86 ms a step (int8: 1.00
        to 0.78) and batch 16 held (1.09 / 1.10 ms; H200, RESULTS.md). A CPU's dots are
        faster than its reductions."""
        if kv_splits is not None:
            check_positive_int("kv_splits", kv_splits)
        if cache_dtype is not None and jnp.dtype(cache_dtype).name not in CACHE_DTYPES:
            raise ConfigError(f"cache dtype {jnp.dtype(cache_dtype).name}: expected one of "
                              f"{', '.join(CACHE_DTYPES)}")
        if cfg.objective not in ("causal_lm", "seq2seq"):
            raise ConfigError(f"model.family={cfg.family}: generation needs a decoder-only "
                              f"(causal LM) or encoder-decoder family, not a {cfg.objective} "
                              f"model")
        if "params" in state:  # a train state's parts: merge them into one variable dict
            merged = dict(state["params"])
            _deep_update(merged, state.get("model_state", {}))
            state = merged
        # another LM's state (as a draft model is made from its target) may hold int8 weights
        # or weights laid out inputs last: each is read back whole, in its own layout
        decoded = lambda x: isinstance(x, (InputsLast, Int8Weight))  # noqa: E731
        state = jax.tree.map(lambda x: x[...] if decoded(x) else x, state, is_leaf=decoded)
        cfg, state = unstack_layers(cfg, state)
        abstract = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))
        graphdef, abstract_state = nnx.split(abstract)
        rules = DEFAULT_RULES if rules is None else rules
        if mesh is not None:
            logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract_state))
            shardings = tree_shardings(logical, mesh, rules)
            check_divisible(state, shardings)
            state = jax.device_put(state, shardings)
        if quantize is not None:
            if quantize != "int8":
                raise ConfigError(f"--quantize={quantize}: expected int8")
            state = quantize_state(state, abstract_state)  # from the stored (master) weights
        else:
            state = cast_matmul_weights(state, abstract_state, cfg.dtype)
        if inputs_last is None:
            inputs_last = jax.default_backend() == "gpu"
        if inputs_last:
            state = inputs_last_state(state, abstract_state)
        limit = getattr(cfg, "max_positions", None)
        context_len = limit if context_len is None else min(context_len, limit or context_len)
        return cls(cfg, graphdef, state, mesh, rules, context_len,
                   None if cache_dtype is None else jnp.dtype(cache_dtype), decoder_start_id,
                   kv_splits, inputs_last)

    @property
    def seq2seq(self) -> bool:
        """An encoder-decoder: the prompt is the encoder's input, the decoder starts from
        `decoder_start_id`."""
        return self.cfg.objective == "seq2seq"

    def decoded_len(self, prompt_len: int) -> int:
        """Tokens in a row's self-attention cache after its prefill: the prompt, or (seq2seq)
        the decoder start token."""
        return 1 if self.seq2seq else prompt_len

    @contextlib.contextmanager
    def rules_scope(self):
        """The scope a traced decoding function runs in: the mesh's logical rules, if any."""
        with contextlib.ExitStack() as stack:
            if self.mesh is not None:
                stack.enter_context(use_rules(self.mesh, self.rules))
            yield

    def model(self, state):
        return nnx.merge(self.graphdef, state)

    def empty_cache(self, state, batch: int, max_len: int):
        """Inside a trace: every layer's empty cache, in the cache dtype, sharded by the rules."""
        cache = self.model(state).stack().empty_cache(batch, max_len)
        cache = kv.map_caches(lambda c: c.replace(kv_splits=self.kv_splits), cache)
        return kv.constrain_caches(kv.cast_caches(cache, self.cache_dtype))

    def hidden(self, state, tokens_BxS, positions_BxS, segment_ids_BxS, cache,
               memory_BxMxD=None, memory_segment_ids_BxM=None):
        """Inside a trace: (final residual stream [B, S, D], updated cache) for S new tokens per
        row, appended to the cache at each row's length. seq2seq: `memory` (the encoder output)
        on the first call fills the cross-attention caches; later calls read them."""
        model = self.model(state)
        if self.seq2seq:
            h_BxSxD, inputs = model.embed_tokens(
                tokens_BxS, positions_BxS, segment_ids_BxS, memory_BxSxD=memory_BxMxD,
                memory_segment_ids_BxS=memory_segment_ids_BxM, cache_len=kv.self_cache_len(cache))
        else:
            h_BxSxD, inputs = model.embed_tokens(tokens_BxS, positions_BxS, segment_ids_BxS)
        h_BxSxD, _, cache = model.stack()(h_BxSxD, inputs, cache)
        return h_BxSxD, kv.constrain_caches(cache)

    def prefill(self, state, tokens_BxP, lens_B, max_len: int):
        """Inside a trace: prompts [B, P] (padding after each row's length) read into a fresh
        cache of `max_len` slots per row: (float32 logits [B, V] of each row's next token, the
        cache with each row's length set, those lengths). seq2seq: the prompts go through the
        encoder once and the decoder reads its start token with them as memory."""
        B, P = tokens_BxP.shape
        real_BxP = (jnp.arange(P) < lens_B[:, None]).astype(jnp.int32)
        positions_BxP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
        cache = self.empty_cache(state, B, max_len)
        if self.seq2seq:
            memory_BxPxD, _ = self.model(state).encode(tokens_BxP, positions_BxP, real_BxP)
            ones_Bx1 = jnp.ones((B, 1), jnp.int32)
            h_Bx1xD, cache = self.hidden(state, ones_Bx1 * self.decoder_start_id, 0 * ones_Bx1,
                                         ones_Bx1, cache, memory_BxPxD, real_BxP)
            lens_B = ones_Bx1[:, 0]
        else:
            h_BxPxD, cache = self.hidden(state, tokens_BxP, positions_BxP, real_BxP, cache)
            h_Bx1xD = jnp.take_along_axis(h_BxPxD, (lens_B - 1)[:, None, None], axis=1)
        return self.logits(state, h_Bx1xD)[:, 0], kv.with_lengths(cache, lens_B), lens_B

    def logits(self, state, h_BxSxD):
        """float32 logits [B, S, V] of a residual stream."""
        return self.model(state).logits(h_BxSxD).astype(jnp.float32)

    def forward(self, state, tokens_BxS, positions_BxS, segment_ids_BxS, cache):
        """(logits [B, S, V] float32, cache) of S new tokens per row."""
        h_BxSxD, cache = self.hidden(state, tokens_BxS, positions_BxS, segment_ids_BxS, cache)
        return self.logits(state, h_BxSxD), cache

    def batch_multiple(self) -> int:
        """Rows a batch must be a multiple of: the size of the mesh axes rows are split over."""
        if self.mesh is None:
            return 1
        with use_rules(self.mesh, self.rules):
            return mesh_axis_of("act_batch")[1]


def unstack_layers(cfg: ModelConfig, state: dict) -> tuple[ModelConfig, dict]:
    """A scanned model as decoding runs it: (its config with `scan_layers=False`, the variable
    dict with each stacked leaf split into one leaf per unit). Why: a decode step of a scanned
    stack slices every layer's weights out of the stacked arrays, which XLA copies (0.59 of the
    1B preset's 1.94 ms step on an H200), and writes the whole stacked KV cache anew; as a list,
    each unit's weights and cache are buffers of their own and the cache is updated in place
    (the step fell to 1.32 ms at batch 1 and from 4.38 to 1.24 ms at batch 16)."""
    if not getattr(cfg, "scan_layers", False):
        return cfg, state
    cfg = dataclasses.replace(cfg, scan_layers=False, scan_unroll=1)
    listed = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))))

    def split(path):  # an unscanned path names its unit: ('layers', 3, ...) <- ('layers', ...)
        keys = [k.key for k in path]
        at = next((i for i, k in enumerate(keys) if isinstance(k, int)), None)
        return keys, at, tuple(keys if at is None else keys[:at] + keys[at + 1:])

    units = {}  # stacked path -> units the list holds
    for path, _ in jax.tree_util.tree_leaves_with_path(listed):
        keys, at, src = split(path)
        if at is not None:
            units[src] = max(units.get(src, 0), keys[at] + 1)

    def take(path, want):
        keys, at, src = split(path)
        x = state
        for k in src:
            if not isinstance(x, dict) or k not in x:
                raise ConfigError(f"the model state has no {'/'.join(map(str, src))}: expected "
                                  f"the variables of a model.family={cfg.family} model")
            x = x[k]
        stacked = tuple(want.shape) if at is None else (units[src],) + tuple(want.shape)
        if tuple(x.shape) != stacked:
            raise ConfigError(f"{'/'.join(map(str, src))} has shape {tuple(x.shape)}; "
                              f"model.family={cfg.family} expects {stacked}")
        if at is None:
            return x
        if isinstance(x, jax.ShapeDtypeStruct):  # an abstract state (shapes only)
            return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
        return x[keys[at]]
    return cfg, jax.tree_util.tree_map_with_path(take, listed)


def _deep_update(into: dict, other: dict):
    for k, v in other.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            into[k] = dict(into[k])
            _deep_update(into[k], v)
        else:
            into[k] = v
