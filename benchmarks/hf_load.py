"""Load time of a Hugging Face Llama checkpoint into jaxlm, beside the disk's read bandwidth
measured in the same process: `python benchmarks/hf_load.py [--fsdp N] [--smoke]`.

transformers writes an 8B Llama-3-shaped model with random bf16 weights (on the GPU, to be
quick); its pages are dropped from the page cache (posix_fadvise DONTNEED after a sync), the
files are read once with plain threads (the disk's bandwidth), dropped again, and jaxlm loads
them (jaxlm.hf.load: memory-mapped, straight into the shardings of a `fsdp=N` mesh, bf16).
A second, warm load (pages cached) shows what is left when the disk is not the limit.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                     low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=8192))
SMOKE = dict(LLAMA_8B, vocab_size=512, hidden_size=64, intermediate_size=128,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def write_checkpoint(directory: Path, shape: dict) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    with torch.device(device):
        model = LlamaForCausalLM._from_config(LlamaConfig(**shape), dtype=torch.bfloat16)
    model.save_pretrained(str(directory), max_shard_size="5GB")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    print(f"transformers wrote {directory} in {time.perf_counter() - t0:.1f} s", flush=True)


def shard_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def drop_cache(files) -> None:
    os.sync()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_bandwidth(files, threads: int = 8, chunk: int = 64 << 20) -> tuple[float, int]:
    """(GB/s, bytes): every file read once, `threads` readers over 64 MiB chunks."""
    jobs = [(f, off) for f in files for off in range(0, f.stat().st_size, chunk)]

    def read(job):
        f, off = job
        with open(f, "rb", buffering=0) as fh:
            fh.seek(off)
            return len(fh.read(chunk))
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(read, jobs))
    return total / (time.perf_counter() - t0) / 1e9, total


def jaxlm_load(directory: Path, fsdp: int) -> tuple[float, int]:
    """(seconds, bytes loaded onto the devices)."""
    import jax

    from jaxlm.config import load_config
    from jaxlm.hf.load import load
    from jaxlm.parallel.sharding import make_mesh
    from jaxlm.state import build_state
    cfg = load_config(None, [f"model.init_from={directory}", "model.param_dtype=bfloat16",
                             "model.dtype=bfloat16", "mesh.data=1", f"mesh.fsdp={fsdp}",
                             "data.seq_len=2048", "train.global_batch_size=8"])
    mesh = make_mesh(dict(data=1, fsdp=fsdp, tensor=1, sequence=1, expert=1, stage=1),
                     devices=jax.devices()[:fsdp])
    spec = build_state(cfg, mesh)
    abstract = {"params": spec.abstract_state["params"]}
    t0 = time.perf_counter()
    weights = jax.block_until_ready(load(directory, cfg.model, abstract))
    seconds = time.perf_counter() - t0
    nbytes = sum(x.nbytes for x in jax.tree.leaves(weights))
    del weights
    return seconds, nbytes


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/tmp/hf-llama-8b")
    p.add_argument("--fsdp", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="a tiny model (CPU check)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    directory = Path(args.dir)
    if not shard_files(directory):
        write_checkpoint(directory, SMOKE if args.smoke else LLAMA_8B)
    files = shard_files(directory)
    drop_cache(files)
    disk_gbs, file_bytes = read_bandwidth(files)
    drop_cache(files)
    import jax
    cold_s, loaded = jaxlm_load(directory, args.fsdp)
    warm_s, _ = jaxlm_load(directory, args.fsdp)
    result = dict(device=jax.devices()[0].device_kind, devices=args.fsdp,
                  file_gb=file_bytes / 1e9, loaded_gb=loaded / 1e9, disk_read_gbs=disk_gbs,
                  cold_load_s=cold_s, cold_gbs=file_bytes / cold_s / 1e9,
                  warm_load_s=warm_s, warm_gbs=file_bytes / warm_s / 1e9)
    print("RESULT " + json.dumps(result), flush=True)
    Path(args.out, f"hf_load_fsdp{args.fsdp}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
