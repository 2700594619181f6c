"""smc: sequential Monte Carlo on the `ppl` core.

- `particle_filter(key, model, args, observations, num_particles, proposal=None,
  resampling="systematic", ess_threshold=0.5, rejuvenation=None)`: a particle filter
  over the steps of a `ppl.scan` state-space model, built on `ScanGF.step` and
  `ppl.particle_key`; returns a `ParticleFilterResult` (log_marginal, log_weights,
  ess per step, ancestors, particles, and `paths()` for whole trajectories).
- Resamplers `multinomial`, `systematic`, `stratified`, `residual`, each a pure
  jittable `(key, log_weights [N], n) -> ancestors [n] int32`.

Not yet here (tracked in the SMC issue): rejuvenation moves, early stopping of finished
particles, tempered SMC, conditional SMC / particle Gibbs, and the LLM methods.
"""

from ._filter import ParticleFilterResult, particle_filter
from ._resampling import multinomial, residual, stratified, systematic

__all__ = ["particle_filter", "ParticleFilterResult", "multinomial", "systematic", "stratified", "residual"]
