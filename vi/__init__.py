"""vi: programmable variational inference on the `ppl` core.

An objective is an ordinary function `objective(key, params) -> scalar`, a bound to
maximize in expectation over `key`. It draws from guides (and models) with
`vi.simulate` / `vi.generate` and evaluates densities through the generative function
interface. `vi.grad(objective)` turns it into `(key, params) -> (value, grads)`, an
unbiased estimate of the objective and its gradient, whatever the objective computes.

Each random site of a guide carries its gradient estimator by wrapping its
distribution: `vi.reparam(d)` (pathwise), `vi.reinforce(d, baseline=...)` (score
function; baseline a constant, `"leave_one_out"` or `"moving_average"`), `vi.enum(d)`
(exact sum over a finite support), `vi.mvd(d)` (measure-valued derivative), `vi.rsvi(d)`
(reparameterized rejection sampling for Gamma, Beta, Dirichlet). An unwrapped site is
reparam where the distribution has `rsample`, else reinforce. How the estimators compose, and why the sum is unbiased, is written in the
VI guide of the documentation and in `vi/_grad.py`.

- Objectives: `elbo`, `iwae`, `renyi`, `vimco`, `rws` (reweighted wake-sleep) and
  `sivi` (semi-implicit, an inner importance sampler for the guide's marginal), and
  `log_weights` to write new ones; `learning_signal` sets per-particle signals.
- Guides: `auto_normal` (mean-field) and `auto_mvn` (full-rank) Gaussians on the
  unconstrained space, at the model's addresses.
- `fit(key, objective, params, optimizer, num_steps)`: optax, jitted chunks of
  `lax.scan`, progress bar, checkpoint and bit-exact resume; returns `(params, history)`.
- `stateful_grad(objective)`: `vi.grad` as an `(init, step)` pair carrying the moving
  averages of `baseline="moving_average"` sites from step to step (`fit` uses it).
"""

from ._estimators import Estimated, enum, mvd, reinforce, reparam, rsvi
from ._fit import fit
from ._flows import IAF, AffineCoupling, DiagonalAffine, Flow, FlowDistribution, Planar, Radial, flow_guide
from ._grad import generate, grad, learning_signal, simulate
from ._guides import auto_mvn, auto_normal
from ._objectives import elbo, iwae, log_weights, renyi, rws, sivi, vimco
from ._stateful import MovingAverage, StatefulGrad, stateful_grad

__all__ = [
    "grad", "simulate", "generate", "learning_signal",
    "stateful_grad", "StatefulGrad", "MovingAverage",
    "reparam", "reinforce", "enum", "mvd", "rsvi", "Estimated",
    "elbo", "iwae", "renyi", "vimco", "rws", "sivi", "log_weights",
    "auto_normal", "auto_mvn",
    "flow_guide", "FlowDistribution", "Flow", "DiagonalAffine", "Planar", "Radial", "AffineCoupling", "IAF",
    "fit",
]
