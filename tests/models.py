"""Models shared by several test files."""

import numpyro.distributions as dist

import ppl


@ppl.gen
def regression(xs):
    slope = ppl.sample("slope", dist.Normal(0.0, 1.0))
    noise = ppl.sample("noise", dist.HalfNormal(1.0))
    return ppl.sample("ys", dist.Normal(slope * xs, noise))
