"""`python -m jaxlm.serve --run RUN_DIR [--step N] | --hf DIR [--host H] [--port P] ...`: an
OpenAI-compatible HTTP server (jaxlm.serve.server) over a trained run or a Hugging Face model
directory. Bad flags or files are one line on stderr and exit code 2, never a traceback; once
the model is loaded, uvicorn serves until Ctrl-C.
"""
from __future__ import annotations

import os
import re
import sys
import time

from jaxlm.config import ConfigError
from jaxlm.generate.cli import EXIT_BAD_INPUT, model_parser
from jaxlm.generate.lm import CACHE_DTYPES


def parse_args(argv):
    p = model_parser("python -m jaxlm.serve", __doc__.splitlines()[0], "[--port N] [options]",
                     "safetensors, config.json, tokenizer.json; its chat template if it has one")
    h = p.add_argument_group("http")
    h.add_argument("--host", default="127.0.0.1", help="address to listen on")
    h.add_argument("--port", type=int, default=8000)
    h.add_argument("--model-name", help="the name clients ask for (default: the directory's)")
    e = p.add_argument_group("engine")
    e.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    e.add_argument("--pages", type=int, default=0,
                   help="KV pages (0: as many as --memory-fraction of free device memory holds)")
    e.add_argument("--memory-fraction", type=float, default=0.85)
    e.add_argument("--max-seqs", type=int, default=64, help="requests computed at once")
    e.add_argument("--token-budget", type=int, default=512, help="tokens one step computes")
    e.add_argument("--no-chunked-prefill", action="store_true",
                   help="prefill each prompt in one step (--token-budget must hold one)")
    e.add_argument("--no-prefix-caching", action="store_true")
    e.add_argument("--max-model-len", type=int,
                   help="longest prompt + output (default: the model's context)")
    e.add_argument("--max-queue", type=int, default=1024,
                   help="waiting requests beyond this are answered 429")
    e.add_argument("--mesh", help="device mesh, e.g. tensor=4 (default: one device)")
    e.add_argument("--cache-dtype", choices=CACHE_DTYPES,
                   help="KV pages' dtype (default: the model's; int8: one float32 scale per "
                        "stored vector, about half the bytes of bfloat16)")
    return p.parse_args(argv)


def serve_config(args):
    from jaxlm.serve.engine import ServeConfig
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port={args.port}: expected 1..65535")
    if args.hf and args.step is not None:
        raise ConfigError("--step reads a run's checkpoint; an --hf directory has one set of "
                          "weights")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise ConfigError(f"--max-model-len={args.max_model_len}: expected >= 2")
    return ServeConfig(page_size=args.page_size, pages=args.pages,
                       memory_fraction=args.memory_fraction, max_seqs=args.max_seqs,
                       token_budget=args.token_budget, chunked_prefill=not args.no_chunked_prefill,
                       prefix_caching=not args.no_prefix_caching,
                       max_model_len=args.max_model_len, max_queue=args.max_queue).validate()


def flag_names(message: str) -> str:
    """The engine names ServeConfig fields (serve.max_seqs); here they are flags (--max-seqs)."""
    return re.sub(r"serve\.([a-z_]+)", lambda m: "--" + m[1].replace("_", "-"), message)


def build(args, warmup: bool = False):
    """Load the model and build the app (every problem a ConfigError)."""
    from jaxlm import faults
    from jaxlm.generate.load import load_hf, load_run, parse_mesh
    from jaxlm.serve.chat import ChatTemplate
    from jaxlm.serve.engine import ServingEngine
    from jaxlm.serve.server import build_app

    faults.quiet_library_noise()
    cfg = serve_config(args)
    mesh = parse_mesh(args.mesh)
    loaded = (load_hf(args.hf, mesh, args.cache_dtype) if args.hf
              else load_run(args.run, args.step, mesh, args.cache_dtype))
    tokenizer = loaded.tokenizer
    engine = ServingEngine(loaded.lm, cfg, eos_id=getattr(tokenizer, "eos_id", None))
    if warmup:  # every step shape compiled now, not while the first requests wait
        t0 = time.perf_counter()
        engine.warmup()
        print(f"compiled the engine's step shapes in {time.perf_counter() - t0:.1f} s; "
              f"{engine.pool.num_blocks - 1} KV pages of {cfg.page_size} tokens", flush=True)
    template = ChatTemplate.beside(getattr(tokenizer, "path", None))
    name = args.model_name or os.path.basename(os.path.normpath(args.hf or args.run))
    return build_app(engine, tokenizer, name, template)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        app = build(args, warmup=True)
    except ConfigError as e:
        print(f"error: {flag_names(str(e))}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    import uvicorn
    uvicorn.run(app, host=args.host, port=args.port, log_level="info",
                timeout_graceful_shutdown=10)
    return 0
