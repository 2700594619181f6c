"""Spreading a particle (or chain) axis over the available devices.

With several devices (GPUs, TPU cores, or CPU devices forced with
`XLA_FLAGS=--xla_force_host_platform_device_count=4`), constraining the per-particle
keys to be sharded along their leading axis lets XLA's partitioner split the whole
vmapped computation by particle; reductions over particles (logsumexp) become
cross-device reductions. On one device this is a no-op.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["shard_leading_axis"]

AXIS = "particles"


def shard_leading_axis(x):
    """Constrain `x`'s leaves to be split along axis 0 over all devices, when it divides."""
    devices = jax.devices()
    n = len(jax.tree.leaves(x)[0]) if jax.tree.leaves(x) else 0
    if len(devices) < 2 or n % len(devices):
        return x
    sharding = NamedSharding(Mesh(devices, (AXIS,)), PartitionSpec(AXIS))
    return jax.lax.with_sharding_constraint(x, sharding)
