"""`python -m jaxlm.train --config FILE [a.b=c ...]`: the story of a run, top to bottom.

config -> mesh -> data -> sharded state (fresh or resumed) -> compiled step -> loop
(log, eval, checkpoint) -> final eval and checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import sys
import time
from pathlib import Path

from jaxlm import distributed, faults, rundir
from jaxlm.config import Config, ConfigError, check_against_devices, diff_from_defaults, \
    load_config


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, like every other bad input
        self.exit(2, f"error: {message} (usage: python -m jaxlm.train --config FILE "
                     f"[key.sub=value ...])\n")


def parse_args(argv):
    p = _Parser(prog="python -m jaxlm.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="YAML config; may be repeated, later files override earlier ones")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="overrides applied after the files, e.g. train.steps=100")
    return p.parse_args(argv)


def configure_runtime(cfg: Config):
    """Settings that must be made before JAX starts its backends."""
    import jax
    if cfg.runtime.cpu_devices:
        try:
            jax.config.update("jax_num_cpu_devices", cfg.runtime.cpu_devices)
        except RuntimeError:  # backends already started (tests, notebooks): keep what is there
            if jax.default_backend() == "cpu" and jax.device_count() != cfg.runtime.cpu_devices:
                raise ConfigError(f"runtime.cpu_devices={cfg.runtime.cpu_devices}, but JAX already "
                                  f"started with {jax.device_count()} CPU devices") from None
    if cfg.runtime.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", cfg.runtime.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
        rundir.check(cfg)  # fail before JAX starts or any log is written (run() checks again)
        configure_runtime(cfg)
        distributed.initialize(cfg.distributed)  # multi-process: before any other JAX call
        distributed.log_to_file(cfg.train.run_dir)
        run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return faults.EXIT_BAD_INPUT
    except faults.RunStopped as e:  # preempted, non-finite, a checkpoint that cannot be written
        return _stopped(str(e), e.code)
    except KeyboardInterrupt:  # Ctrl-C before the run could install its handler: nothing to save
        return _stopped("interrupted before training started; nothing was saved", 130)
    except OSError as e:  # writing the run directory (logs, metrics): disk full, permissions, I/O
        return _stopped(f"cannot write {e.filename or 'to the run directory'}: "
                        f"{e.strerror or e}; the run stopped", faults.EXIT_WRITE_FAILED)
    return faults.EXIT_OK


def _stopped(line: str, code: int) -> int:
    """One line for a run that stopped on purpose (README: 'Faults and exit codes')."""
    faults.log.info(line)  # the process log
    if code == faults.EXIT_PREEMPTED:
        print(line, flush=True)
    else:
        print(f"error: {line}", file=sys.stderr, flush=True)
    return code


def say(msg: str):
    import jax
    logging.getLogger("jaxlm").info(msg)  # every process: <run_dir>/logs/process_<i>.log
    if jax.process_index() == 0:
        from tqdm import tqdm
        tqdm.write(msg, file=sys.stdout)


def run(cfg: Config) -> dict:
    """Train as configured; returns the last logged metrics (used by tests and benchmarks).
    Raises ConfigError for bad input (nothing written), faults.RunStopped for a fault it stopped
    on; either way the data reader, an in-flight checkpoint save and the loggers are closed."""
    with contextlib.ExitStack() as cleanup:
        return _run(cfg, cleanup)


def _run(cfg: Config, cleanup: contextlib.ExitStack) -> dict:
    import jax
    from jaxlm import metrics as M
    from jaxlm.checkpoint import Checkpointer
    from jaxlm.data import DataIterator, build_datasets, eval_batches
    from jaxlm.parallel.sharding import local_batch_rows, make_mesh
    from jaxlm.step import abstract_batch, build_step_fns
    from jaxlm import nonfinite, preemption

    # ---- checks before anything is written; from here on SIGTERM/SIGINT stop at a step boundary
    resume_changes = rundir.check(cfg)
    preempt = cleanup.enter_context(preemption.Preemption(jax.process_count() > 1))

    # ---- mesh and run directory
    sizes = check_against_devices(cfg, jax.device_count())
    mesh = make_mesh(sizes, dcn_sizes=dataclasses.asdict(cfg.mesh.dcn))
    run_dir = Path(cfg.train.run_dir)
    changed = diff_from_defaults(cfg)
    say("config (changed from defaults):" + "".join(
        f"\n  {k}: {old!r} -> {new!r}" for k, (old, new) in changed.items()
        if k != "mesh.rules") + ("\n  mesh.rules: (custom table)" if "mesh.rules" in changed else ""))
    device = jax.devices()[0]
    say(f"devices: {jax.device_count()} x {device.device_kind} ({jax.default_backend()}), "
        f"{jax.process_count()} process(es); mesh "
        + (" x ".join(f"{a}={n}" for a, n in sizes.items() if n > 1) or "1 device"))

    # ---- step functions, then data: each process reads the batch rows its devices hold
    fns = build_step_fns(cfg, mesh)
    B, S = cfg.train.global_batch_size, cfg.data.seq_len
    rows = local_batch_rows(fns.batch_sharding, B)
    data = build_datasets(cfg.data, cfg.model.vocab_size, cfg.model.objective)
    for k, (length, _) in data.fields.items():  # seq_len was checked with the mesh
        if length % sizes["sequence"]:
            raise ConfigError(f"data.target_len: the decoder fields ({k}) are {length} long "
                              f"(0: derived), not divisible by mesh.sequence={sizes['sequence']}")
    train_iter = DataIterator(data.train, B, cfg.data.seed, prefetch=cfg.data.prefetch,
                              local_rows=rows)
    cleanup.callback(train_iter.close)
    evals = eval_batches(data.eval, B, cfg.train.eval_batches, local_rows=rows)

    # ---- state: fresh, or resumed from the newest intact checkpoint
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint) if cfg.checkpoint.enabled else None
    resumed = ckpt.restore_latest(fns.abstract_state, say) if ckpt and cfg.checkpoint.resume \
        else None
    if resumed is not None:
        latest, state, data_state = resumed
        if data_state["iterator"]:  # empty: weights imported by jaxlm.convert, data from its start
            train_iter.restore(data_state["iterator"])
        elif data_state.get("fingerprint") is not None:
            raise ConfigError(f"checkpoint {latest} has no data position to resume from")
        if data_state.get("fingerprint") not in (data.fingerprint, None):
            say(f"warning: the data corpus differs from the one checkpoint {latest} was trained on")
        say(f"resumed from step {latest} ({ckpt.step_dir(latest)})")
    elif cfg.model.init_from:
        from jaxlm.hf.load import load
        abstract = {k: v for k, v in fns.abstract_state.items() if k in ("params", "model_state")}
        state = fns.from_weights(load(cfg.model.init_from, cfg.model, abstract), cfg.train.seed)
        say(f"initialised from {cfg.model.init_from} (optimizer state fresh)")
    else:
        state = fns.init(cfg.train.seed)
    start = int(state["step"])
    if ckpt:
        cleanup.callback(_settle, ckpt)  # an in-flight save of a good state still commits

    # ---- the run is accepted: its first writes
    if jax.process_index() == 0:
        dropped = rundir.prepare(cfg, start)
        if dropped:
            say(f"metrics.jsonl: dropped {dropped} records of steps after {start}, where this "
                f"run continues")
    if resume_changes:
        say("changed on resume (allowed): " + "; ".join(resume_changes))
    say(f"model: {fns.param_count / 1e6:.2f}M parameters; run dir {run_dir}")

    def to_global(batch_np):  # only the fields the model reads (data.fields), [B, length] each
        batch_np = fns.lay_out({k: batch_np[k] for k in data.fields})
        return {k: jax.make_array_from_process_local_data(fns.batch_sharding, batch_np[k],
                                                          (B, length))
                for k, (length, _) in data.fields.items()}

    eval_arrays = [to_global(b) for b in evals]

    def evaluate():
        nll, count = 0.0, 0.0
        for b in eval_arrays:
            n, c = fns.eval_step(state, b)
            nll, count = nll + float(n), count + float(c)
        loss = nll / max(count, 1.0)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

    # ---- compile once, ahead of time, so compile time is reported apart from step time
    t0 = time.perf_counter()
    step_fn = fns.train_step.lower(
        fns.abstract_state, abstract_batch(cfg, fns.batch_sharding, data.fields)).compile()
    compile_s = time.perf_counter() - t0
    say(f"train step compiled in {compile_s:.1f} s")
    say(memory_report(fns.abstract_state, step_fn.memory_analysis()))

    flops_tok = cfg.model.run_flops_per_token(cfg.data)
    peak = M.peak_flops(device.device_kind, cfg.log.peak_tflops)
    if cfg.model.matmul_precision == "fp8" and peak:
        say("fp8 matmuls: MFU is still counted against the bf16 peak (fp8's is twice that)")
    tokens_per_step = B * S
    writer = M.MetricsWriter(run_dir, cfg.log.jsonl, cfg.log.tensorboard)
    cleanup.callback(writer.close)
    monitor = nonfinite.Monitor(cfg.train.on_nonfinite, cfg.train.max_skipped_steps, say,
                                eager=jax.process_count() == 1)
    writer.write(start, {"compile_time_s": compile_s})
    last: dict = {}
    if start >= cfg.train.steps:
        say(f"already trained to step {start} (train.steps={cfg.train.steps}); nothing to do")

    if start == 0 and cfg.train.eval_every:
        initial = evaluate()  # the baseline the run's eval losses are read against
        say(M.format_line(0, initial))
        writer.write(0, initial)

    from tqdm import tqdm
    bar = tqdm(total=cfg.train.steps, initial=start, unit="step", dynamic_ncols=True,
               # None: tqdm shows the bar only on a terminal (CI logs stay readable)
               disable=True if not cfg.log.progress or jax.process_index() != 0 else None,
               file=sys.stdout)
    cleanup.callback(bar.close)
    preempt.start(start)
    window_start, window_steps = time.perf_counter(), 0
    data_wait = 0.0  # seconds this window spent waiting for the data iterator
    unlogged = None  # a log step's window, read once the next step is queued (the GPU never idles)

    def log(step: int, pending, steps: int, waited: float, with_eval: bool) -> dict:
        """The window ending at `step`: waits for that step alone, then writes its line."""
        nonlocal window_start
        host = jax.device_get(pending)  # closes the timing window
        monitor.check(upto=step)  # every flag to this step, read while we sync anyway
        now = time.perf_counter()
        dt = (now - window_start) / steps
        window_start = now
        tps = tokens_per_step / dt
        rec = {"loss": float(host["loss"]), "lr": float(host["lr"]),
               "grad_norm": float(host["grad_norm"]), "tokens_per_sec": tps,
               "step_time_s": dt, "mfu": M.mfu(tps, flops_tok, peak, jax.device_count()),
               "data_wait_s": waited / steps}
        stats = {k: float(v) for k, v in host["stats"].items()}  # the model's own, by name
        rec.update(stats)
        mem_b = M.peak_memory_bytes()
        rec["peak_mem_gib"] = mem_b / 2**30 if mem_b else None
        if monitor.skipped:
            rec["skipped_steps"] = monitor.skipped
        if with_eval:
            rec.update(evaluate())  # the state is this step's: nothing later was queued
            window_start = time.perf_counter()
        say(M.format_line(step, rec, stats))
        bar.set_postfix(loss=f"{rec['loss']:.3f}")
        writer.write(step, rec)
        return rec

    for step in range(start + 1, cfg.train.steps + 1):
        t_data = time.perf_counter()
        batch = nonfinite.inject(train_iter.next(), step)  # a no-op unless a drill asks
        data_wait += time.perf_counter() - t_data
        state, pending = step_fn(state, to_global(batch))
        monitor.record(step, pending["nonfinite"])
        window_steps += 1
        bar.update(1)
        if unlogged:  # the previous step's window, read while this step runs
            last = log(*unlogged, with_eval=False)
            unlogged = None
        is_last = step == cfg.train.steps
        # train.eval_every=0: evaluate only at the end
        eval_now = is_last or bool(cfg.train.eval_every) and step % cfg.train.eval_every == 0
        if step % cfg.log.every_steps == 0 or is_last:
            window = (step, pending, window_steps, data_wait)
            window_steps, data_wait = 0, 0.0
            if eval_now:  # evaluation reads this step's state: no later step first
                last = log(*window, with_eval=True)
            else:
                unlogged = window
        elif eval_now:
            ev = evaluate()
            say(M.format_line(step, ev))
            writer.write(step, ev)
            window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
        preempted = preempt.reached(step) and not is_last
        if ckpt and (step % cfg.checkpoint.every_steps == 0 or is_last or preempted):
            monitor.check()  # a non-finite state never reaches a checkpoint
            ckpt.save(step, state, {"iterator": train_iter.state(),
                                    "fingerprint": data.fingerprint})
        if ckpt:
            ckpt.poll()  # a background save that failed stops the run now
        if preempted:
            if unlogged:
                last = log(*unlogged, with_eval=False)
            preempt.stop(step, ckpt)  # waits for the checkpoint to commit, raises RunStopped
    if ckpt:
        ckpt.wait()
    return {**last, "compile_time_s": compile_s, "state": state}


def _settle(ckpt):
    """On the way out (also after a fault): let an in-flight save of a good state commit."""
    try:
        ckpt.wait()
    except faults.RunStopped as e:  # a second fault: keep the first one's exit line
        faults.log.error(str(e))
    ckpt.close()


def memory_report(abstract_state, analysis) -> str:
    """Per-device bytes: state from its shardings, activations/temporaries from the compiler."""
    from jaxlm.parallel.sharding import bytes_per_device
    mib = lambda b: f"{b / 2**20:,.1f} MiB"  # noqa: E731
    parts = [f"params {mib(bytes_per_device(abstract_state['params']))}",
             f"optimizer state {mib(bytes_per_device(abstract_state['opt_state']))}"]
    if analysis is not None:
        parts.append(f"activations/temp {mib(analysis.temp_size_in_bytes)}")
    return "memory per device: " + ", ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
