"""What the Hugging Face tests share: tiny random transformers models saved locally (no
download), jaxlm's logits for an imported directory, and the parity bounds of the HF issue
(fp32: max |diff| <= 1e-4 and KL <= 1e-6, on a batch with a row of 520 tokens)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LONG = 520  # RoPE mistakes hide in short inputs


def save_hf(model, path) -> str:
    """model.save_pretrained(path) in eval mode; returns the directory as a string."""
    model.eval()
    model.save_pretrained(str(path))
    return str(path)


def random_tokens(vocab: int, batch: int = 2, length: int = LONG, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length))


def hf_logits(model, tokens, **kwargs) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens), **kwargs).logits.double().numpy()


def jaxlm_model(hf_dir, *overrides):
    """(config, model) with the weights of hf_dir loaded through jaxlm.hf.load on one device."""
    import jax
    from flax import nnx

    from jaxlm.config import load_config
    from jaxlm.hf.load import load
    from jaxlm.models.registry import build_model
    from jaxlm.parallel.sharding import make_mesh
    from jaxlm.state import abstract_weights
    cfg = load_config(None, [f"model.init_from={hf_dir}", "data.seq_len=1024", *overrides])
    mesh = make_mesh(dict(data=1, fsdp=1, tensor=1, sequence=1, expert=1, stage=1),
                     devices=jax.devices()[:1])
    weights = load(hf_dir, cfg.model, abstract_weights(cfg.model, mesh, cfg.mesh.rules))
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(cfg.model, nnx.Rngs(0))))
    return cfg, nnx.merge(graphdef, weights["params"], weights.get("model_state", {}))


def assert_parity(ours, ref, atol=1e-4, max_kl=1e-6):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    diff = np.abs(ours - ref).max()
    lp = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
    lq = ours - np.logaddexp.reduce(ours, axis=-1, keepdims=True)
    kl = np.max(np.sum(np.exp(lp) * (lp - lq), axis=-1))
    assert diff <= atol and kl <= max_kl, f"max |diff| {diff:.3g}, max KL {kl:.3g}"
