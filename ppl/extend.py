"""Helpers for code that builds inference on the core (`inference/`, `smc/`, `vi/`).

The public extension surface besides `ppl.handle` / `ppl.SiteHandler`: argument and key
checks with the core's messages, the split of argument pytrees into traced and static
parts used for `jax.jit`, and address formatting for messages.
"""

from ._distribution import is_concrete
from ._errors import format_address, suggest
from ._gfi import check_args, check_key, check_selection
from ._static import Static, combine, partition

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
]
