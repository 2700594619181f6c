"""ppl: the traced core of the framework.

Generative functions (`@gen` DSL functions, numpyro distributions via `distribution`,
and the combinators `vmap`, `scan`, `switch`, `mask`) answer the generative function
interface: `simulate`, `assess`, `generate`, `update`, `regenerate` (and `project`).
Traces and choice maps are pytrees, so everything composes with `jax.jit`,
`jax.vmap`, `jax.lax.scan` and `jax.grad`. See DESIGN.md for the contract.
"""

from ._choicemap import ChoiceMap
from ._selection import Selection, select
from ._distribution import DistributionGF, distribution
from ._dsl import Factor, GenFunction, Observed, Reward, Site, factor, gen, reward, sample
from ._errors import (
    AddressError,
    ArgumentError,
    DuplicateAddressError,
    InferenceError,
    ObservationError,
    PPLError,
    UnknownAddressError,
)
from ._gfi import GenerativeFunction
from ._mask import MaskGF, mask
from ._scan import ScanGF, scan
from ._switch import SwitchGF, switch
from ._trace import Trace
from ._vmap import VmapGF, vmap

__all__ = [
    # modeling language
    "gen",
    "sample",
    "factor",
    "reward",
    "distribution",
    # combinators
    "vmap",
    "scan",
    "switch",
    "mask",
    # data
    "Trace",
    "ChoiceMap",
    "Selection",
    "select",
    # classes
    "GenerativeFunction",
    "GenFunction",
    "DistributionGF",
    "VmapGF",
    "ScanGF",
    "SwitchGF",
    "MaskGF",
    "Site",
    "Observed",
    "Factor",
    "Reward",
    # errors
    "PPLError",
    "AddressError",
    "DuplicateAddressError",
    "UnknownAddressError",
    "ObservationError",
    "ArgumentError",
    "InferenceError",
]
