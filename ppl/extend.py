"""Helpers for code that builds inference on the core (`inference/`, `smc/`, `vi/`).

The public extension surface besides `ppl.handle` / `ppl.SiteHandler`: argument and key
checks with the core's messages, the split of argument pytrees into traced and static
parts used for `jax.jit`, and address formatting for messages.
"""

from ._distribution import is_concrete
from ._errors import format_address, suggest
from ._gfi import check_args, check_key, check_selection
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

__all__ = [
    "check_key",
    "check_args",
    "check_selection",
    "partition",
    "combine",
    "Static",
    "is_concrete",
    "format_address",
    "suggest",
    "site_scores",
]
