"""The GPT-2 peer: the same 124M GPT-2 as configs/gpt2-small.yaml, written plainly in PyTorch
(LayerNorm, fused qkv with biases, SDPA causal attention, GELU(tanh) MLP, tied head), trained
with bf16 autocast, fused AdamW and torch.compile on synthetic tokens. A benchmark peer, not part
of jaxlm. Prints one `RESULT {json}` line: step time, tokens/s, MFU with jaxlm's GPT-2 formula
(6 x matmul params + 6 x layers x seq x d for causal attention).

  python3 benchmarks/gpt2_torch.py [--batch 16] [--seq 1024] [--steps 20]
"""
from __future__ import annotations

import argparse
import json
import time

PEAK = 989.4e12  # H100/H200 dense bf16, the same table jaxlm uses


def build(vocab, d, layers, heads, seq):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, h):
            B, S, _ = h.shape
            q, k, v = self.qkv(self.ln1(h)).view(B, S, 3, heads, d // heads).unbind(2)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                               v.transpose(1, 2), is_causal=True)
            h = h + self.proj(o.transpose(1, 2).reshape(B, S, d))
            return h + self.down(F.gelu(self.up(self.ln2(h)), approximate="tanh"))

    class GPT2(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq, d)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.ln_f = nn.LayerNorm(d)

        def forward(self, tokens):
            x, y = tokens[:, :-1], tokens[:, 1:]
            h = self.wte(x) + self.wpe.weight[:x.shape[1]]
            for block in self.blocks:
                h = block(h)
            logits = self.ln_f(h) @ self.wte.weight.T   # tied head
            return F.cross_entropy(logits.float().view(-1, vocab), y.reshape(-1))

    torch.manual_seed(0)
    model = GPT2()
    for p in model.parameters():  # GPT-2's init (and jaxlm's): N(0, 0.02) weights, zero biases
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.zeros_(p)
    for block in model.blocks:  # LayerNorm scales back to 1
        block.ln1.weight.data.fill_(1.0), block.ln2.weight.data.fill_(1.0)
    model.ln_f.weight.data.fill_(1.0)
    return model.cuda()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    import torch
    model = build(a.vocab, a.d, a.layers, a.heads, a.seq)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1, fused=True)
    compiled = torch.compile(model)
    tokens = torch.randint(3, a.vocab, (a.batch, a.seq + 1), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / a.steps
    matmul = a.layers * (4 * a.d * a.d + 8 * a.d * a.d) + a.d * a.vocab
    flops = 6 * matmul + 6 * a.layers * a.seq * a.d
    tps = a.batch * a.seq / dt
    print("RESULT " + json.dumps({"name": "torch.compile GPT-2", "step_ms": dt * 1e3,
                                  "tokens_per_sec": tps, "mfu": tps * flops / PEAK,
                                  "compile_s": compile_s, "loss": float(loss),
                                  "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}),
          flush=True)


if __name__ == "__main__":
    main()
