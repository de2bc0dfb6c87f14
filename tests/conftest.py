"""Every test sees 8 simulated CPU devices, so meshes of up to 8 devices can be built."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after the flags above)
import pytest  # noqa: E402

assert jax.device_count() == 8, "tests need 8 simulated CPU devices"


@pytest.fixture(scope="session")
def xla_cache_dir(tmp_path_factory):
    """A compilation cache the CLI subprocesses of a session share (runtime.compilation_cache)."""
    return tmp_path_factory.mktemp("xla_cache")
