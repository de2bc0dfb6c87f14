"""`python -m jaxlm.generate --run RUN_DIR [--step N] | --hf DIR [--prompt TEXT ...]`: text from
a trained run or a Hugging Face model directory. Prompts come from --prompt (repeatable), --prompt-file (one per line, or JSONL with a
"prompt" field) or stdin. One prompt streams its tokens to stdout as they come; several are
written as JSONL (stdout or --output), one record per prompt in input order. Bad input is one
line on stderr and exit code 2, never a traceback."""
from __future__ import annotations

import argparse
import json
import sys

from jaxlm.config import ConfigError
from jaxlm.generate.lm import CACHE_DTYPES
from jaxlm.generate.sampling import SamplingConfig, cut_at_stop
from jaxlm.generate.text import TextStream

EXIT_BAD_INPUT = 2


class OneLineParser(argparse.ArgumentParser):
    """A usage error is one line on stderr (with the short usage) and exit code 2."""

    def __init__(self, *args, short_usage: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.short_usage = short_usage

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"error: {message} (usage: {self.short_usage})\n")


def model_parser(prog: str, description: str, options: str, hf_holds: str) -> OneLineParser:
    """A parser with the model source every model-loading command takes: --run | --hf, --step."""
    p = OneLineParser(prog=prog, description=description,
                      short_usage=f"{prog} --run RUN_DIR | --hf DIR {options}")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--run", metavar="RUN_DIR", help="a training run directory")
    model.add_argument("--hf", metavar="DIR", help=f"a Hugging Face model directory ({hf_holds})")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    return p


def parse_args(argv):
    p = model_parser("python -m jaxlm.generate", __doc__.splitlines()[0],
                     "[--prompt TEXT] [options]", "safetensors, config.json, tokenizer.json")
    src = p.add_argument_group("prompts")
    src.add_argument("--prompt", action="append", default=[], help="may be repeated")
    src.add_argument("--prompt-file", help="one prompt per line, or JSONL with a 'prompt' field")
    src.add_argument("--output", help="write JSONL here instead of stdout")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    s.add_argument("--top-k", type=int, default=0, help="0: off")
    s.add_argument("--top-p", type=float, default=1.0, help="1: off")
    s.add_argument("--min-p", type=float, default=0.0, help="0: off")
    s.add_argument("--repetition-penalty", type=float, default=1.0, help="1: off")
    s.add_argument("--presence-penalty", type=float, default=0.0, help="0: off")
    s.add_argument("--stop", action="append", default=[], help="stop string; may be repeated")
    s.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    b = p.add_argument_group("beam search")
    b.add_argument("--beams", type=int, default=0, help="beam width (0: sample)")
    b.add_argument("--length-penalty", type=float, default=1.0)
    b.add_argument("--early-stopping", action="store_true")
    d = p.add_argument_group("speculative decoding")
    d.add_argument("--draft-run", help="a smaller run with the same tokenizer: the draft model")
    d.add_argument("--draft-step", type=int)
    d.add_argument("--prompt-lookup", type=int, default=0, metavar="N",
                   help="draft by matching the last N tokens earlier in the text (0: off)")
    d.add_argument("--speculate", type=int, default=4, metavar="K", help="draft tokens per step")
    e = p.add_argument_group("engine")
    e.add_argument("--mesh", help="device mesh, e.g. data=2,tensor=4 (default: one device)")
    e.add_argument("--cache-dtype", choices=CACHE_DTYPES,
                   help="KV cache storage (int8: per-head absmax scales); default: the model's")
    e.add_argument("--quantize", choices=("int8",),
                   help="matmul weights held as int8 with per-output-channel scales")
    return p.parse_args(argv)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                lines = [ln.rstrip("\n") for ln in f]
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--prompt-file {args.prompt_file}: cannot read it "
                              f"({getattr(e, 'strerror', None) or e})") from None
        for i, line in enumerate(lines, 1):
            if line.lstrip().startswith("{"):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"--prompt-file {args.prompt_file}:{i}: not valid JSON "
                                      f"({e.msg})") from None
                if not isinstance(record.get("prompt"), str):
                    raise ConfigError(f"--prompt-file {args.prompt_file}:{i}: expected a "
                                      f"\"prompt\" string field")
                prompts.append(record["prompt"])
            elif line.strip():
                prompts.append(line)
    if not args.prompt and not args.prompt_file:
        text = sys.stdin.read() if not sys.stdin.isatty() else ""
        prompts = [text.rstrip("\n")] if text.strip() else []
    if not prompts:
        raise ConfigError("no prompts: give --prompt, --prompt-file or text on stdin")
    return prompts


def sampling_of(args, i: int, tokenizer) -> SamplingConfig:
    return SamplingConfig(args.temperature, args.top_k, args.top_p, args.min_p,
                          args.repetition_penalty, args.presence_penalty, args.max_tokens,
                          args.seed + i, tuple(args.stop)).validate()


def check_args(args):
    if args.beams < 0:
        raise ConfigError(f"--beams={args.beams}: expected >= 0")
    if args.speculate < 1:
        raise ConfigError(f"--speculate={args.speculate}: expected >= 1")
    if args.prompt_lookup < 0:
        raise ConfigError(f"--prompt-lookup={args.prompt_lookup}: expected >= 0")
    modes = [m for m, on in (("--beams", args.beams), ("--draft-run", args.draft_run),
                             ("--prompt-lookup", args.prompt_lookup)) if on]
    if len(modes) > 1:
        raise ConfigError(f"{' and '.join(modes)} cannot be combined: pick one decoding mode")


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        check_args(args)
        return run(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT


def run(args) -> int:
    from jaxlm import faults
    from jaxlm.generate.engine import Engine, Request
    from jaxlm.generate.load import load_hf, load_run, parse_mesh

    faults.quiet_library_noise()
    prompts = read_prompts(args)
    mesh = parse_mesh(args.mesh)
    if args.hf and args.step is not None:
        raise ConfigError("--step reads a run's checkpoint; an --hf directory has one set of "
                          "weights")
    loaded = (load_hf(args.hf, mesh, args.cache_dtype, args.quantize) if args.hf else
              load_run(args.run, args.step, mesh, args.cache_dtype, args.quantize))
    tok = loaded.tokenizer
    requests = [Request(tok.encode(p), sampling_of(args, i, tok)) for i, p in enumerate(prompts)]
    eos = getattr(tok, "eos_id", None)
    if args.beams:
        from jaxlm.generate.beam import BeamConfig, beam_search
        beam = BeamConfig(args.beams, args.length_penalty, args.early_stopping).validate()
        results = [beam_search(loaded.lm, r.prompt_ids, beam, r.sampling.max_tokens, eos)
                   for r in requests]
        ids, reasons, extra = [r.ids for r in results], [r.finish_reason for r in results], {}
    elif args.draft_run or args.prompt_lookup:
        from jaxlm.generate.speculative import speculate_run
        ids, reasons, extra = speculate_run(args, loaded, requests, eos)
    elif len(requests) == 1 and not args.output:
        return _stream(Engine(loaded.lm, eos), requests[0], prompts[0], tok, args.stop)
    else:
        outs = Engine(loaded.lm, eos).generate(requests)
        ids, reasons, extra = [o.ids for o in outs], [o.finish_reason for o in outs], {}
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for i, (prompt, row, reason) in enumerate(zip(prompts, ids, reasons)):
            text, stopped = cut_at_stop(tok.decode(row), args.stop)
            record = {"prompt": prompt, "completion": text,
                      "finish_reason": "stop" if stopped else reason, "tokens": len(row),
                      **{k: v[i] if isinstance(v, list) else v for k, v in extra.items()}}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def _stream(engine, request, prompt: str, tok, stops) -> int:
    """Print the prompt, then the completion as it comes (jaxlm.generate.text: text that could
    still turn out to begin a stop string is held back until it cannot)."""
    sys.stdout.write(prompt)
    sys.stdout.flush()
    text = TextStream(tok, stops)
    for t in engine.stream(request):
        piece = text.push([t])
        if piece:
            sys.stdout.write(piece)
            sys.stdout.flush()
        if text.stopped:
            break
    sys.stdout.write(text.finish() + "\n")
    sys.stdout.flush()
    return 0
