"""`Wrapped`: a distribution that stands for another one.

The estimator wrappers (`vi.reparam`, `vi.reinforce`, ...) and the views the gradient
machinery hands the core (a reinforce draw cut from the gradient, an rsvi draw, an mvd
re-run or scoring run) all keep `base`'s shapes, support and density and change only
how they draw or what `log_prob` means; they subclass this.
"""

from __future__ import annotations

import numpyro.distributions as dist


class Wrapped(dist.Distribution):
    """`base`'s shapes, support, draws and density; subclasses override what differs."""

    def __init__(self, base: dist.Distribution):
        self.base = base
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def support(self):
        return self.base.support

    def sample(self, key, sample_shape=()):
        return self.base.sample(key, sample_shape)

    def log_prob(self, value):
        return self.base.log_prob(value)
