"""inference: importance sampling, and the pieces MCMC kernels are built on, all written
only against the generative function interface and the public site handlers of `ppl`."""

from ._gibbs import GibbsInfo, MixtureState, gibbs, mixture
from ._hmc import HMCInfo, HMCState, hmc, nuts
from ._importance import ImportanceResult, importance, log_ess
from ._kernels import CycleState, Kernel, MHInfo, MHState, cycle, mh, mh_proposal
from ._predictive import predictive
from ._runner import run_mcmc, run_nuts
from ._samples import ConvergenceWarning, Samples
from ._unconstrained import to_constrained, to_unconstrained, unconstrained

__all__ = [
    "importance", "ImportanceResult", "log_ess", "unconstrained", "to_unconstrained", "to_constrained",
    # MCMC
    "Kernel", "mh", "mh_proposal", "hmc", "nuts", "gibbs", "cycle", "mixture",
    "MHState", "MHInfo", "HMCState", "HMCInfo", "GibbsInfo", "CycleState", "MixtureState",
    "run_mcmc", "run_nuts", "Samples", "ConvergenceWarning", "predictive",
]
