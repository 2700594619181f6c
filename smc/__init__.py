"""smc: sequential Monte Carlo on the `ppl` core.

- `particle_filter(key, model, args, observations, num_particles, proposal=None,
  resampling="systematic", ess_threshold=0.5, rejuvenation=None)`: a particle filter
  over the steps of a `ppl.scan` state-space model, built on `ScanGF.step` and
  `ppl.particle_key`; returns a `ParticleFilterResult` (log_marginal, log_weights,
  ess per step, ancestors, particles, and `paths()` for whole trajectories), with
  optional MCMC rejuvenation (any `inference.Kernel`) after each resampling; particles
  that finish early (a `ppl.mask`ed step and a done flag in the carry) keep their weight
  and carry, and with `is_finished` the run ends its work once all have finished;
  `history="choices"` keeps each step's choices and scores (`StepChoices`), not the
  carries.
- `tempered(key, model, args, observations, num_particles, kernel=None, ...)`: adaptive
  tempered SMC for a static model, from the prior to the posterior, standard or
  waste-free; returns a `TemperedResult` (log_marginal, particles, temperatures, ess,
  acceptance, step sizes).
- Resamplers `multinomial`, `systematic`, `stratified`, `residual`, each a pure
  jittable `(key, log_weights [N], n) -> ancestors [n] int32`.
- `csmc(key, model, args, observations, reference, num_particles, ancestor_sampling=False)`:
  conditional SMC, one move of a trajectory that leaves the smoothing distribution
  invariant; `csmc_kernel` and `particle_gibbs` make it an `inference.Kernel` (states
  alone, or alternated with a kernel on the parameters) for `inference.run_mcmc`.
- `backward_simulation(key, result, num_samples)`: forward filtering, backward
  simulation of smoothed trajectories from a `particle_filter` result.

LLM inference-time scaling lives in `smc.llm`: a language model's reasoning process as
a `ppl.scan` model with a process-reward likelihood, particle filtering over it with
`particle_filter`, the baselines at equal budget, and a built-in task with its trained
language model and reward model.
"""

from ._csmc import CSMCResult, csmc
from ._filter import ParticleFilterResult, StepChoices, particle_filter
from ._particle_gibbs import (CSMCInfo, CSMCState, ParticleGibbsInfo, ParticleGibbsState, csmc_kernel,
                              particle_gibbs)
from ._resampling import multinomial, residual, stratified, systematic
from ._smoothing import backward_simulation
from ._tempered import TemperedResult, tempered

__all__ = ["particle_filter", "ParticleFilterResult", "StepChoices", "multinomial", "systematic", "stratified",
           "residual"]
__all__ += ["csmc", "CSMCResult", "csmc_kernel", "particle_gibbs", "CSMCState", "CSMCInfo", "ParticleGibbsState",
            "ParticleGibbsInfo", "backward_simulation"]
__all__ += ["tempered", "TemperedResult"]
