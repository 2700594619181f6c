"""inference: importance sampling (this package), MCMC kernels and runners (to come),
all written only against the generative function interface of `ppl`."""

from ._importance import ImportanceResult, importance, log_ess

__all__ = ["importance", "ImportanceResult", "log_ess"]
