"""Every test sees 8 simulated CPU devices, so meshes of up to 8 devices can be built."""
import os

from xla_flags import COMPILE

# The 8 simulated devices are threads that meet at every collective; on a loaded 2-core box
# one can be starved past XLA:CPU's default rendezvous limit, which aborts the whole process
# (seen twice in full-suite runs, in the pipeline tests): give the rendezvous minutes, not
# seconds. A real deadlock still ends, at pytest's own timeouts or CI's.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8"
                           + " --xla_cpu_collective_call_terminate_timeout_seconds=900"
                           + " --xla_cpu_collective_timeout_seconds=900"
                           + " --xla_cpu_collective_call_warn_stuck_timeout_seconds=120"
                           + " " + COMPILE).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU runs every device's thunks, blocking collective waits included, on one intra-op pool
# of max(cores, devices) = 8 workers here. When all 8 hold waits whose peers are still queued
# behind them, the process deadlocks at zero CPU: caught in test_pipeline's fsdp x 1f1b cell,
# gdb showed the 8 pool threads in 7 CollectivePermutes and 1 AllGather (CI aborted there at
# the rendezvous limit). PJRT_NPROC sizes the pool (xla/pjrt/utils.cc DefaultThreadPoolSize);
# with 64 workers a deadlock needs 64 such waits at once, and test_pipeline.py runs no slower on
# 2 cores. The CLI tests' subprocesses inherit it.
os.environ.setdefault("PJRT_NPROC", "64")

import jax  # noqa: E402  (after the flags above)
import pytest  # noqa: E402

assert jax.device_count() == 8, "tests need 8 simulated CPU devices"

# One compilation cache for the session: tests that build the same model on the same mesh (each
# family's reference runs, the resume runs) compile each program once.
import tempfile  # noqa: E402
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="jaxlm-test-xla-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


@pytest.fixture(scope="session")
def xla_cache_dir(tmp_path_factory):
    """A compilation cache the CLI subprocesses of a session share (runtime.compilation_cache)."""
    return tmp_path_factory.mktemp("xla_cache")
