"""inference: importance sampling, and the pieces MCMC kernels are built on, all written
only against the generative function interface and the public site handlers of `ppl`."""

from ._importance import ImportanceResult, importance, log_ess
from ._unconstrained import to_constrained, to_unconstrained, unconstrained

__all__ = ["importance", "ImportanceResult", "log_ess", "unconstrained", "to_unconstrained", "to_constrained"]
