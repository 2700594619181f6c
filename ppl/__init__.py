"""ppl: the traced core of the framework.

Generative functions (`@gen` DSL functions, numpyro distributions via `distribution`,
and the combinators `vmap`, `scan`, `switch`, `mask`) answer the generative function
interface: `simulate`, `assess`, `generate`, `update`, `regenerate` (and `project`).
Traces and choice maps are pytrees, so everything composes with `jax.jit`,
`jax.vmap`, `jax.lax.scan` and `jax.grad`.

Extension: `handle(gen_fn, SiteHandler)` reinterprets every site of a model (the seam
inference code uses to build unconstrained densities, tempering and per-site gradient
estimators); `particle_key(key, i)` is the key of particle `i` of a batch.
"""

from ._choicemap import ChoiceMap
from ._selection import Selection, select
from ._distribution import DistributionGF, distribution
from ._dsl import GenFunction, deterministic, factor, gen, reward, sample
from . import _errors
from ._errors import *  # noqa: F403 - the error classes, listed in _errors.__all__
from ._gfi import GenerativeFunction
from ._keys import ParticleKey, particle_key
from ._mask import MaskGF, mask
from ._scan import ScanGF, scan
from ._site import HandledGF, Site, SiteHandler, handle
from ._switch import SwitchGF, switch
from ._trace import Trace
from ._vmap import VmapGF, vmap

__all__ = [
    # modeling language
    "gen",
    "sample",
    "factor",
    "reward",
    "deterministic",
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
    # keys
    "particle_key",
    "ParticleKey",
    # extension: site handlers
    "handle",
    "Site",
    "SiteHandler",
    # classes
    "GenerativeFunction",
    "GenFunction",
    "DistributionGF",
    "VmapGF",
    "ScanGF",
    "SwitchGF",
    "MaskGF",
    "HandledGF",
]
__all__ += _errors.__all__  # PPLError and its subclasses
