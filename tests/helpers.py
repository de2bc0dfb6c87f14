"""Small shared builders for the tests: a tiny config and fixed packed batches."""
import numpy as np

from jaxlm.config import load_config
from jaxlm.data import ByteTokenizer, pack_documents

TINY = ["model.vocab_size=300", "model.d_model=32", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "model.ffn_dim=64", "data.seq_len=32", "data.max_bytes=100000",
        "train.global_batch_size=8", "optim.warmup_steps=2", "optim.lr=0.01", "train.steps=6",
        "log.progress=false", "log.tensorboard=false", "log.every_steps=1", "train.eval_every=0",
        "train.eval_batches=1", "checkpoint.every_steps=3", "checkpoint.async_save=false"]


def tiny_config(*overrides):
    return load_config(None, TINY + list(overrides))


def packed_batches(cfg, n, seed=0):
    """n global batches of real packed text with several documents per row."""
    rng = np.random.default_rng(seed)
    docs = [bytes(rng.integers(32, 127, rng.integers(5, 40)).astype(np.uint8)) for _ in range(400)]
    ds = pack_documents(docs, ByteTokenizer(), cfg.data.seq_len)
    B = cfg.train.global_batch_size
    return [ds.get(np.arange(i * B, (i + 1) * B)) for i in range(n)]
