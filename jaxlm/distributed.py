"""Joining a multi-process run (jax.distributed) under SLURM, Kubernetes, Cloud TPU or by hand.

`resolve` is a pure function from (config, environment variables) to who the coordinator is, how
many processes there are and which one this is, so every scheduler's mapping is testable without
processes. `initialize` then calls `jax.distributed.initialize` before any other JAX call, bounded
by `distributed.init_timeout_s`: a coordinator that cannot be reached, or peers that never arrive,
end in one `error: ...` line and exit code 2 instead of a silent wait or a C++ abort. Once running,
a dead peer stops the others within `distributed.heartbeat_timeout_s` (JAX's coordination service
aborts them), and a process that raises exits at once instead of waiting in the shutdown barrier.
`log_to_file` gives every process its own log in the run directory.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import re
import socket
import sys
import threading
from pathlib import Path
from typing import Mapping

from jaxlm.config import ConfigError, DistributedConfig

log = logging.getLogger("jaxlm")

DEFAULT_PORT = 1234  # where no scheduler suggests one (JAX's own examples use it too)
# JAX aborts the process itself once its own init timeout passes; ours fires first so the user
# gets a readable line, and JAX's stays as a backstop.
_JAX_TIMEOUT_MARGIN_S = 30


@dataclasses.dataclass(frozen=True)
class Launch:
    """This process's place in a multi-process run. None fields are left to JAX's detection."""
    coordinator: str | None         # host:port of process 0's coordination service
    num_processes: int | None
    process_id: int | None
    local_device_ids: tuple[int, ...] | None  # None: every local accelerator
    source: str                     # the scheduler the values came from, for messages
    coordinator_from: str = ""      # the key or variable that named the coordinator
    jax_detects: bool = False       # let jax.distributed fill what is None (TPU VMs, Open MPI)


# ---------------------------------------------------------------- environment -> Launch (pure)

def resolve(cfg: DistributedConfig, env: Mapping[str, str]) -> Launch | None:
    """Config keys first, then JAXLM_* variables, then the scheduler's own variables (SLURM,
    Kubernetes Indexed Job, Cloud TPU). None: a single-process run, nothing to initialise."""
    explicit = {"coordinator": cfg.coordinator, "num_processes": cfg.num_processes or None,
                "process_id": cfg.process_id if cfg.process_id >= 0 else None}
    if cfg.detect == "off":
        named = [f"distributed.{k}" for k, v in explicit.items() if v is not None]
        if named:
            raise ConfigError(f"distributed.detect=off, but {named[0]} is set; remove it or use "
                              f"distributed.detect=auto")
        return None
    values, origin = {}, {}
    for key, env_name, parse in (("coordinator", "JAXLM_COORDINATOR", str),
                                 ("num_processes", "JAXLM_NUM_PROCESSES", int),
                                 ("process_id", "JAXLM_PROCESS_ID", int)):
        if explicit[key] is not None:
            values[key], origin[key] = explicit[key], f"distributed.{key}"
        elif env.get(env_name, "").strip():
            values[key], origin[key] = _parse_env(env, env_name, parse), env_name
    found = _from_scheduler(env, cfg.coordinator_port, values)
    local_ids, source = None, "explicit settings"
    if found is not None:
        source, sched_values, sched_origin, local_ids = found
        for key, value in sched_values.items():
            if key not in values:
                values[key], origin[key] = value, sched_origin[key]
    if cfg.detect == "jax" or (found is not None and source == "Cloud TPU"):
        return Launch(values.get("coordinator"), values.get("num_processes"),
                      values.get("process_id"), local_ids, "JAX cluster detection"
                      if cfg.detect == "jax" else source, origin.get("coordinator", "JAX"),
                      jax_detects=True)
    if not values:
        return None
    missing = [k for k in ("coordinator", "num_processes", "process_id") if k not in values]
    if missing:
        have = ", ".join(f"{k} from {origin[k]}" for k in values)
        need = " and ".join(f"distributed.{k} (or JAXLM_{k.upper()})" for k in missing)
        raise ConfigError(f"distributed: a multi-process run needs {need}; only got {have} "
                          f"(no SLURM step or Kubernetes Indexed Job found to fill the rest)")
    n, i, coordinator = values["num_processes"], values["process_id"], values["coordinator"]
    if n < 1:
        raise ConfigError(f"{origin['num_processes']}: {n} is not a number of processes (>= 1)")
    if not 0 <= i < n:
        raise ConfigError(f"{origin['process_id']}: process id {i} is not in [0, {n}) "
                          f"({n} processes, from {origin['num_processes']})")
    _check_address(coordinator, origin["coordinator"])
    if n == 1:
        return None
    return Launch(coordinator, n, i, local_ids, source, origin["coordinator"])


def _from_scheduler(env, port: int, explicit: dict):
    """(source, values, origins, local_device_ids) from SLURM / Kubernetes / TPU, or None."""
    if env.get("SLURM_STEP_NODELIST") and env.get("SLURM_PROCID"):  # inside `srun`
        n_name = "SLURM_STEP_NUM_TASKS" if env.get("SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS"
        values = {"num_processes": _parse_env(env, n_name, int),
                  "process_id": _parse_env(env, "SLURM_PROCID", int)}
        origin = {"num_processes": n_name, "process_id": "SLURM_PROCID",
                  "coordinator": "SLURM_STEP_NODELIST"}
        if "coordinator" not in explicit:
            host = first_slurm_host(env["SLURM_STEP_NODELIST"])
            if not port:  # a port per job, so two jobs sharing a node do not collide (as JAX does)
                port = _parse_env(env, "SLURM_JOB_ID", int) % 4096 + 61440 \
                    if env.get("SLURM_JOB_ID") else DEFAULT_PORT
            values["coordinator"] = f"{host}:{port}"
        return "SLURM", values, origin, _slurm_local_device_ids(env)
    if env.get("JOB_COMPLETION_INDEX", "").strip():  # Kubernetes Indexed Job (or JobSet) pod
        values = {"process_id": _parse_env(env, "JOB_COMPLETION_INDEX", int)}
        origin = {"process_id": "JOB_COMPLETION_INDEX"}
        for key in ("coordinator", "num_processes"):
            if key not in explicit:
                raise ConfigError(
                    f"Kubernetes Indexed Job found (JOB_COMPLETION_INDEX="
                    f"{env['JOB_COMPLETION_INDEX']}), but {key} is unknown: set JAXLM_"
                    f"{key.upper()} in the pod spec ("
                    + ("<job-name>-0.<headless-service>:<port>" if key == "coordinator"
                       else "the Job's completions") + ")")
        return "Kubernetes Indexed Job", values, origin, None
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):  # GKE TPU slice(s)
        return "Cloud TPU", {}, {}, None
    return None


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist: 'gpu[003-010,12],cpu1' -> 'gpu003'."""
    depth, end = 0, len(nodelist)
    for pos, ch in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            end = pos
            break
    first = nodelist[:end].strip()
    # each bracket group expands first to the first value of its first range
    host = re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], first)
    if not host or "[" in host or "]" in host:
        raise ConfigError(f"SLURM_STEP_NODELIST: cannot read a host name from {nodelist!r}")
    return host


def _slurm_local_device_ids(env) -> tuple[int, ...] | None:
    """One GPU per process when several tasks share a node and each still sees every GPU
    (`--gpus-per-node`); all of them with one task per node, or when SLURM already bound one
    GPU to each task (`--gpus-per-task=1` sets CUDA_VISIBLE_DEVICES per task)."""
    per_node = []
    for part in env.get("SLURM_STEP_TASKS_PER_NODE", "").split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m:
            per_node += [int(m.group(1))] * int(m.group(2) or 1)
    node = _parse_env(env, "SLURM_NODEID", int) if env.get("SLURM_NODEID", "").strip() else 0
    here = per_node[node] if node < len(per_node) else 1
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if here <= 1 or len(visible) == 1 or not env.get("SLURM_LOCALID", "").strip():
        return None
    return (_parse_env(env, "SLURM_LOCALID", int),)


def _parse_env(env, name: str, parse):
    raw = env[name].strip()
    try:
        return parse(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r}: expected an integer") from None


def _check_address(address: str, origin: str):
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{origin}: {address!r} is not host:port (e.g. node001:1234)")


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


# ---------------------------------------------------------------- joining the run

def initialize(cfg: DistributedConfig, env: Mapping[str, str] | None = None) -> Launch | None:
    """Join the multi-process run if one is configured or detected; call before any other JAX
    call. Returns the Launch, or None for a single-process run (nothing is initialised)."""
    launch = resolve(cfg, os.environ if env is None else env)
    if launch is None:
        return None
    import jax
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU across processes
    kwargs = dict(coordinator_address=launch.coordinator, num_processes=launch.num_processes,
                  process_id=launch.process_id,
                  local_device_ids=list(launch.local_device_ids or []) or None,
                  # our values are complete: keep JAX from re-deriving them (e.g. one GPU per
                  # process from SLURM_LOCALID when the job runs one process per node)
                  cluster_detection_method=None if launch.jax_detects else "deactivate",
                  initialization_timeout=cfg.init_timeout_s + _JAX_TIMEOUT_MARGIN_S,
                  heartbeat_timeout_seconds=cfg.heartbeat_timeout_s,
                  shutdown_timeout_seconds=cfg.shutdown_timeout_s)
    accepted = inspect.signature(jax.distributed.initialize).parameters
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    who = (f"process {launch.process_id} of {launch.num_processes}"
           if launch.num_processes else "this process")
    where = launch.coordinator or "the coordinator JAX detects"
    if launch.process_id == 0 and launch.coordinator:
        _check_port_free(split_address(launch.coordinator)[1], launch)
    done = threading.Event()
    threading.Thread(target=_watchdog, args=(done, cfg.init_timeout_s, launch, who),
                     name="jaxlm-init-watchdog", daemon=True).start()
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # JAX raises for what fails fast (a busy port, bad values)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")
        hint = ("; JAX's detection found no cluster to fill the rest (distributed.detect=jax)"
                if launch.jax_detects else "")
        raise ConfigError(f"distributed: {who} could not join the run at {where} "
                          f"(from {launch.coordinator_from}): {first}{hint}") from None
    finally:
        done.set()
    return launch


def _check_port_free(port: int, launch: Launch):
    """Process 0 serves the coordinator on every interface at this port; JAX fails on a busy
    port with an error, or a crash, that does not say so."""
    try:
        if socket.has_dualstack_ipv6():
            server = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
        else:
            server = socket.create_server(("", port))
        server.close()
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise ConfigError(f"distributed: process 0 cannot serve the coordinator on port {port} "
                          f"(from {launch.coordinator_from}): {reason}; is another run using "
                          f"it? choose another port") from None


def _watchdog(done: threading.Event, timeout_s: int, launch: Launch, who: str):
    """JAX waits inside C++ (GIL released) and aborts with a stack trace when its own timeout
    passes; this thread ends the wait first, with one line that says what is wrong."""
    if done.wait(timeout_s):
        return
    msg = (f"error: distributed: {who} did not join the run within {timeout_s} s "
           f"(distributed.init_timeout_s)")
    if launch.coordinator:
        host, port = split_address(launch.coordinator)
        try:
            socket.create_connection((host, port), timeout=2).close()
            msg += (f": the coordinator at {launch.coordinator} is up, but not all "
                    f"{launch.num_processes} processes joined; check that each was started "
                    f"with the same distributed settings and see their logs")
        except OSError as e:
            reason = e.strerror or str(e) or type(e).__name__
            msg += (f": cannot reach the coordinator at {launch.coordinator} (from "
                    f"{launch.coordinator_from}: {reason}); is process 0 running, and is that "
                    f"its address?")
    if not done.is_set():
        print(msg, file=sys.stderr, flush=True)
        os._exit(2)


# ---------------------------------------------------------------- one log file per process

_HANDLER_TAG = "_jaxlm_process_log"


def log_to_file(run_dir: str | Path) -> Path:
    """Every process writes `<run_dir>/logs/process_<i>.log`: the run's messages (only process 0
    prints them), library warnings and uncaught errors, so a failure on process 7 of 64 can be
    read without process 0's console. Returns the path."""
    import jax
    index = jax.process_index()
    path = Path(run_dir) / "logs" / f"process_{index}.log"
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, _HANDLER_TAG, False)]:
        root.removeHandler(h)  # called again in the same interpreter (tests): one file at a time
        h.close()
    if not root.handlers:  # keep warnings on the console, where logging's last resort put them
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(logging.WARNING)
        from jaxlm.faults import console_filter
        console.addFilter(console_filter)  # orbax's error tracebacks: in the file only
        setattr(console, _HANDLER_TAG, True)
        root.addHandler(console)
    handler = _ProcessLog(Path(run_dir), path)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s p{index} %(levelname)s %(name)s: %(message)s"))
    setattr(handler, _HANDLER_TAG, True)
    root.addHandler(handler)
    log.setLevel(logging.INFO)
    log.info("process %d of %d: pid %d on %s; %d local of %d devices (%s)", index,
             jax.process_count(), os.getpid(), socket.gethostname(), jax.local_device_count(),
             jax.device_count(), jax.default_backend())
    _on_uncaught_exception(multi_process=jax.process_count() > 1)
    return path


class _ProcessLog(logging.Handler):
    """Appends to the log file once the run directory exists (process 0 makes it after the config
    and device checks pass: a run refused earlier leaves no directory behind); records from
    before are kept and written first."""
    MAX_PENDING = 10_000

    def __init__(self, run_dir: Path, path: Path):
        super().__init__()
        self.run_dir, self.path = run_dir, path
        self._file, self._pending = None, []

    def emit(self, record):
        try:
            line = self.format(record) + "\n"
            if self._file is None:
                if not self.run_dir.is_dir():
                    if len(self._pending) < self.MAX_PENDING:
                        self._pending.append(line)
                    return
                self.path.parent.mkdir(exist_ok=True)
                self._file = open(self.path, "a", buffering=1)
                self._file.writelines(self._pending)
                self._pending = []
            self._file.write(line)
        except OSError:  # disk full, directory gone: the run reports that itself, in one line
            self.emit = lambda record: None  # stop writing instead of a traceback per record
        except Exception:
            self.handleError(record)

    def close(self):
        with self.lock:
            if self._file is not None:
                self._file.close()
                self._file = None
        super().close()


def _on_uncaught_exception(multi_process: bool):
    """Log the traceback to the process's file. In a multi-process run, then exit at once: a
    normal exit would wait in jax.distributed's shutdown barrier (distributed.shutdown_timeout_s)
    for peers that are stuck in a collective with this process; exiting stops the heartbeats,
    so the peers stop within distributed.heartbeat_timeout_s."""
    previous = sys.excepthook
    if getattr(previous, _HANDLER_TAG, False):
        previous = previous.previous

    def hook(kind, value, tb):
        log.error("uncaught exception", exc_info=(kind, value, tb))
        previous(kind, value, tb)
        if multi_process:
            sys.stdout.flush()
            sys.stderr.flush()
            logging.shutdown()
            os._exit(1)

    hook.previous = previous
    setattr(hook, _HANDLER_TAG, True)
    sys.excepthook = hook
