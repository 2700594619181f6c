"""Models shared by several test files."""

import math

import numpy as np
import numpyro.distributions as dist

import ppl


@ppl.gen
def regression(xs):
    slope = ppl.sample("slope", dist.Normal(0.0, 1.0))
    noise = ppl.sample("noise", dist.HalfNormal(1.0))
    return ppl.sample("ys", dist.Normal(slope * xs, noise))


# Linear-Gaussian state-space model: x_0 = 0 (the carry), x_t = A x_{t-1} + N(0, Q^2),
# y_t = x_t + N(0, R^2): the particle-filter, csmc and smoothing tests' reference model.
A, Q, R = 0.9, 1.0, 0.5


@ppl.gen
def lgss_step(x_prev, _):
    x = ppl.sample("x", dist.Normal(A * x_prev, Q))
    ppl.sample("y", dist.Normal(x, R))
    return x, None


def kalman(ys, a=A):
    """Kalman filter and RTS smoother of the model above (float64), with transition
    coefficient `a`: log p(ys), filtering, one-step predictive and smoothing moments."""
    m, p, ll = 0.0, 0.0, 0.0
    means, variances, pred_means, pred_vars = [], [], [], []
    for y in np.asarray(ys, dtype=np.float64):
        m, p = a * m, a**2 * p + Q**2
        pred_means.append(m)
        pred_vars.append(p)
        s = p + R**2
        ll += -0.5 * (math.log(2 * math.pi * s) + (y - m) ** 2 / s)
        gain = p / s
        m, p = m + gain * (y - m), (1.0 - gain) * p
        means.append(m)
        variances.append(p)
    sm, sp = [means[-1]], [variances[-1]]
    for t in range(len(means) - 2, -1, -1):
        j = variances[t] * a / pred_vars[t + 1]
        sm.insert(0, means[t] + j * (sm[0] - pred_means[t + 1]))
        sp.insert(0, variances[t] + j**2 * (sp[0] - pred_vars[t + 1]))
    return dict(log_lik=ll, filter_means=np.array(means), filter_vars=np.array(variances),
                pred_vars=np.array(pred_vars), means=np.array(sm), variances=np.array(sp))
