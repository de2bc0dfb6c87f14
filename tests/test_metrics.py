"""The FLOPs/MFU numbers jaxlm prints, against values worked out by hand."""
import json
import pytest

from jaxlm.config import load_config
from jaxlm.metrics import format_line, mfu, peak_flops
from jaxlm.models.llama.config import LlamaConfig


def llama_1b():
    return load_config(["configs/llama-1b.yaml"]).model


def test_matmul_params_llama_1b_by_hand():
    # per layer: q,k,v,o = 4 * 2048*2048 = 16,777,216; mlp = 3 * 2048*5632 = 34,603,008
    # 16 layers = 822,083,584; head 2048*32000 = 65,536,000
    assert llama_1b().matmul_params() == 887_619_584


def test_flops_per_token_llama_1b_by_hand():
    # 6 * 887,619,584 + causal attention 6 * 16 layers * 2048 seq * 2048 width
    assert llama_1b().flops_per_token(2048) == 5_325_717_504 + 402_653_184
    assert llama_1b().flops_per_token(2048, causal=False) == 5_325_717_504 + 805_306_368


def test_gqa_and_explicit_head_dim_counted():
    m = LlamaConfig(d_model=64, num_heads=8, num_kv_heads=2, head_dim=16, ffn_dim=100,
                    num_layers=3, vocab_size=10)
    # q,o: 64*8*16 each; k,v: 64*2*16 each -> 64*16*20 = 20,480; mlp 3*64*100 = 19,200
    assert m.matmul_params() == 3 * (20_480 + 19_200) + 640
    assert m.flops_per_token(32) == 6 * m.matmul_params() + 6 * 3 * 32 * 8 * 16


def test_mfu_and_peak_table():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert peak_flops("NVIDIA H200") == 989.4e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("TPU v5 lite") == 197e12
    assert peak_flops("TPU v5p") == 459e12
    assert peak_flops("cpu") is None
    assert peak_flops("cpu", override_tflops=2.0) == 2e12
    f = llama_1b().flops_per_token(2048)
    # 86,000 tok/s on one H100: 86e3 * 5.728370688e9 / 989.4e12
    assert mfu(86_000, f, 989.4e12, 1) == pytest.approx(0.497918, abs=1e-6)
    assert mfu(8 * 86_000, f, 989.4e12, 8) == pytest.approx(0.497918, abs=1e-6)
    assert mfu(86_000, f, None, 1) is None


def test_log_line_shows_what_is_known():
    line = format_line(7, {"loss": 2.5, "tokens_per_sec": 1234.0, "mfu": None, "lr": 1e-3})
    assert line == "step 7 | loss 2.5000 | lr 1.00e-03 | 1,234 tok/s"


def test_step_profile_attributes_instructions_to_their_source_lines():
    """benchmarks/step_profile.py files GPU kernels under the source line behind their HLO
    instruction: optax's lines are the optimizer, a log-softmax the cross-entropy."""
    import jax
    import jax.numpy as jnp
    import optax
    from benchmarks.step_profile import category, hlo_metadata

    def step(w, x):
        grads = jax.grad(lambda w: -jnp.mean(jax.nn.log_softmax(x @ w)))(w)
        adam = optax.adam(1e-3)
        return adam.update(grads, adam.init(w), w)[0]
    hlo = jax.jit(step).lower(jnp.ones((8, 8)), jnp.ones((4, 8))).compile().as_text()
    meta = hlo_metadata(hlo)
    cats = {category(name, m) for name, m in meta.items()}
    assert {"optimizer update", "cross-entropy and head"} <= cats
    optax_ops = [m for m in meta.values() if any("/optax/" in f for f in m["stack"])]
    assert optax_ops and all(category("fusion", m) == "optimizer update" for m in optax_ops)
    inner = {m["stack"][0] for m in meta.values() if m["stack"]}  # innermost "file:line"
    assert any(f.rsplit(":", 1)[0].endswith("tests/test_metrics.py") for f in inner)
    assert category("nvjet_sm90_tst_128x160", {}) == "matmul forward"


def test_torch_profile_tells_backward_and_optimizer_kernels_by_their_launching_call(tmp_path):
    """benchmarks/torch_profile.py on a real torch.profiler trace of a CPU training step, with
    a GPU kernel (and its launch) added under three CPU ops: a forward matmul, a matmul inside
    autograd's backward, and an op inside `Optimizer.step`. Torch names these by category
    (cpu_op, user_annotation) and by thread; the breakdown must place each kernel by the call
    that launched it, not by its name."""
    import torch
    from benchmarks.torch_profile import breakdown, category
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    model = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(model.parameters())
    prof = profile(activities=[ProfilerActivity.CPU],
                   schedule=schedule(wait=1, warmup=1, active=1, repeat=1))
    hook = register_optimizer_step_post_hook(lambda *a: prof.step())
    with prof:
        for _ in range(4):
            model(torch.randn(4, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
    hook.remove()
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    trace = json.loads((tmp_path / "trace.json").read_text())
    events = trace["traceEvents"]
    ops = [e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op"]
    opt_span = next(e for e in events if e.get("name", "").startswith("Optimizer.step"))

    def launch_under(op, corr, kernel):
        t = op["ts"] + op.get("dur", 0) / 2
        events.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel",
                       "tid": op["tid"], "ts": t, "dur": 1, "args": {"correlation": corr}})
        events.append({"ph": "X", "cat": "kernel", "name": kernel, "tid": 7, "ts": t + 5,
                       "dur": 1000.0 * corr, "args": {"correlation": corr}})
    forward = next(e for e in ops if e["name"] == "aten::addmm")
    in_backward = next(e for e in ops if e["name"] == "aten::mm" and any(
        b["tid"] == e["tid"] and b["ts"] <= e["ts"] <= b["ts"] + b["dur"] for b in ops
        if b["name"].startswith("autograd::engine::evaluate_function")))
    in_opt = next(e for e in ops if e["tid"] == opt_span["tid"]
                  and opt_span["ts"] <= e["ts"] <= opt_span["ts"] + opt_span["dur"])
    launch_under(forward, 1, "sm90_xmma_gemm_bf16bf16_bf16f32")
    launch_under(in_backward, 2, "sm90_xmma_gemm_bf16bf16_bf16f32")
    launch_under(in_opt, 3, "triton_poi_fused_mul_0")
    # a kernel whose launch is not in the trace ran for an earlier step: left out, counted
    events.append({"ph": "X", "cat": "kernel", "name": "sm90_xmma_gemm_bf16bf16_bf16f32",
                   "tid": 7, "ts": forward["ts"], "dur": 4000.0, "args": {"correlation": 99}})
    got = breakdown(trace, steps=1)
    assert got["categories"] == {"matmul forward": 1.0, "matmul backward": 2.0,
                                 "optimizer update": 3.0}
    assert got["kernel_ms"] == 6.0 and got["left_out_ms"] == 4.0
    assert category("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_1", False, False) == "norms"
    assert category("pytorch_flash::flash_bwd_kernel", True, False) == "attention backward"
    cudnn = "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x128"
    assert category(cudnn, True, False) == "attention backward"  # not a GEMM for its sm90_
    from benchmarks.torch_profile import side_by_side
    table = side_by_side({"categories": {"norms": 5.0, "matmul forward": 40.0}, "kernel_ms": 45.0},
                         {"categories": {"norms": 2.0, "matmul forward": 41.0,
                                         "optimizer update": 1.0}, "kernel_ms": 44.0})
    assert table.splitlines()[2:] == ["| norms | 5.0 | 2.0 | +3.0 |",
                                      "| matmul forward | 40.0 | 41.0 | -1.0 |",
                                      "| optimizer update | 0.0 | 1.0 | -1.0 |",
                                      "| GPU kernels in all | 45.0 | 44.0 | +1.0 |"]
