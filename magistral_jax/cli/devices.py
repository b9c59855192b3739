"""Device set-up the subcommands share: simulated CPU devices for a mesh on a machine without
accelerators (`demo --devices`, `train --devices`, `bench rl`)."""

from __future__ import annotations

import os


def simulate_devices(n: int) -> None:
    """Asks XLA for `n` CPU devices; must happen before the first JAX computation."""
    flags = os.environ.get("XLA_FLAGS", "")
    if n > 1 and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
