"""TPU slices for ahead-of-time compilation: each generation's published per-chip figures, the
Cloud TPU slice names (`v5p-128`, `v6e-64`, ...) and the compile-only devices libtpu gives for a
slice that is not here (`jax.experimental.topologies`), one per chip."""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Any

GiB = 2**30


@dataclass(frozen=True)
class Chip:
    """Published per-chip figures of one TPU generation."""

    name: str
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bytes: int
    hbm_bandwidth: float  # bytes/s


# Source: Google Cloud TPU documentation, "System architecture" table of each generation, read on
# 2026-11-29: https://cloud.google.com/tpu/docs/v4 (275 TFLOPs bf16; HBM2 32 GiB, 1200 GBps),
# https://cloud.google.com/tpu/docs/v5e (197 TFLOPs; 16 GB, 819 GBps),
# https://cloud.google.com/tpu/docs/v5p (459 TFLOPs; 95 GiB, 2765 GBps),
# https://cloud.google.com/tpu/docs/v6e (918 TFLOPs; 32 GB, 1638 GBps).
# Capacities are taken as GiB (what the chips carry; XLA's own out-of-memory check on v5p allows
# 95.74 GiB).
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 275e12, 32 * GiB, 1200e9),
    "v5e": Chip("v5e", 197e12, 16 * GiB, 819e9),
    "v5p": Chip("v5p", 459e12, 95 * GiB, 2765e9),
    "v6e": Chip("v6e", 918e12, 32 * GiB, 1638e9),
}

# Slice name -> chip grid, as Cloud TPU names them (v4-N / v5p-N: N TensorCores = N/2 chips;
# v5e-N / v6e-N: N chips).
_GRIDS: dict[str, dict[int, str]] = {
    "v4": {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8", 512: "4x8x8"},
    "v5p": {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8", 512: "4x8x8"},
    "v5e": {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
    "v6e": {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
}
TOPOLOGIES: dict[str, str] = {
    f"{gen}-{n}": f"{gen}:{grid}" for gen, grids in _GRIDS.items() for n, grid in grids.items()
}


@dataclass(frozen=True)
class Topology:
    """A named slice: its libtpu topology string, chip and chip count."""

    name: str  # e.g. v5p-64
    libtpu_name: str  # e.g. v5p:2x4x4
    chip: Chip
    chips: int


def topology(name: str) -> Topology:
    """The named slice (`v5p-64`, `v5e-8`, ...); an unknown name raises ValueError listing the known ones."""
    if name not in TOPOLOGIES:
        known = ", ".join(TOPOLOGIES)
        raise ValueError(f"topology: unknown TPU slice {name!r}; known: {known}")
    gen = name.split("-")[0]
    grid = TOPOLOGIES[name].split(":")[1]
    return Topology(name, TOPOLOGIES[name], CHIPS[gen], math.prod(int(d) for d in grid.split("x")))


def _quiet_libtpu(name: str) -> None:
    # Several processes may compile at once (pytest -n 2): without this libtpu refuses a second
    # load over its lock file. Off a TPU VM, these stop libtpu's start-up probes and warnings.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if os.environ.get("JAX_PLATFORMS") == "cpu":
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", name)


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


@functools.cache
def topology_devices(name: str) -> tuple:
    """Compile-only devices of the named slice, one per chip."""
    from jax.experimental import topologies

    topo = topology(name)
    if not libtpu_available():
        raise ValueError("plan: TPU ahead-of-time compilation needs libtpu: pip install -e '.[tpu]'")
    _quiet_libtpu(name)
    kwargs: dict[str, Any] = {}
    if topo.chip.name in ("v4", "v5p"):
        kwargs["chip_config_name"] = "megacore"  # one device per chip, both TensorCores
    if topo.chips == 1:
        kwargs["chips_per_host_bounds"] = (1, 1, 1)
    devices = topologies.get_topology_desc(topology_name=topo.libtpu_name, platform="tpu", **kwargs).devices
    if len(devices) != topo.chips:
        raise ValueError(f"topology {name}: libtpu gave {len(devices)} devices for {topo.chips} chips")
    return tuple(devices)
