"""Helpers for code that builds inference on the core (`inference/`, `smc/`, `vi/`).

The public extension surface besides `ppl.handle` / `ppl.SiteHandler`: argument and key
checks with the core's messages, the split of argument pytrees into traced and static
parts used for `jax.jit`, address formatting for messages, count checks, the
progress bar every long-running loop shows, and batching of particles or chains that
keeps shared leaves (arguments, observations) once instead of once per member.
"""

import math
import os
import sys

import numpy as np

from ._batching import StateLayout, StatesProgram, StepProgram, vmap_shared, vmap_states
from ._distribution import is_concrete
from ._errors import ArgumentError, format_address, normalize_address, suggest
from ._gfi import check_args, check_key, check_selection
from ._keys import unrolled_key
from ._static import Static, combine, partition
from ._trace import Trace


def site_scores(trace: Trace) -> dict:
    """The log density (or log weight) of each site of `trace`: a dict path -> scalar.

    Paths are tuples of addresses below the trace's generative function; a site inside
    `ppl.vmap` or `ppl.scan` has its stacked axis summed, a masked-off site scores 0.
    Deterministic sites are not listed. Under `jax.vmap` over traces, each entry is
    batched like the trace.
    """
    return dict(trace.gen_fn._site_scores(trace, ()))

def check_count(value, name: str, where: str, minimum: int = 1) -> int:
    """`value` as an int if it is an int (not a bool) >= `minimum`, else an
    `ArgumentError` saying "{where}: {name} must be an int >= {minimum}"."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ArgumentError(f"{where}: {name} must be an int >= {minimum}, got {value!r}.")
    return int(value)


def shows_progress(enabled) -> bool:
    """Whether `progress_bar(enabled, ...)` shows a bar: `enabled`, or for None, stderr is
    a terminal and the `CI` environment variable is unset."""
    if enabled is None:
        return sys.stderr.isatty() and not os.environ.get("CI")
    return bool(enabled)


_PROGRESS_UPDATES = 20


def default_chunk(total: int, enabled) -> int:
    """Steps per jitted scan for a runner of `total` steps: about 20 chunks to feed a
    shown progress bar, else one scan (each chunk boundary costs a dispatch, about 8% of
    a 0.3 s NUTS run in 20 chunks)."""
    return max(1, math.ceil(total / _PROGRESS_UPDATES)) if shows_progress(enabled) else total


def progress_bar(enabled, total: int, desc: str, **tqdm_options):
    """A tqdm bar over `total` steps, or None when off (see `shows_progress`)."""
    if not shows_progress(enabled):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", **tqdm_options)


__all__ = [
    "check_key",
    "check_args",
    "check_selection",
    "partition",
    "combine",
    "Static",
    "is_concrete",
    "format_address",
    "normalize_address",
    "suggest",
    "site_scores",
    "check_count",
    "progress_bar",
    "shows_progress",
    "default_chunk",
    "unrolled_key",
    "vmap_shared",
    "vmap_states",
    "StateLayout",
    "StatesProgram",
    "StepProgram",
]
