"""Every test sees 8 simulated CPU devices, so meshes of up to 8 devices can be built."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after the flags above)

assert jax.device_count() == 8, "tests need 8 simulated CPU devices"
