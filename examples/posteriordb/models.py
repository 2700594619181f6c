"""Twelve posteriordb posteriors written in the DSL, and the registry `POSTERIORS`.

Each model is a translation of the Stan program in `data/<name>.json` (`stan_code`),
taking the data block as arguments (arrays; sizes as Python ints, which are static).
Observations are `obs=` sites, so no constraints are needed to condition a model.
Translation rules, the same everywhere:

- Stan's `normal(mu, sigma)` takes a standard deviation, as `dist.Normal` does;
  `gamma(a, b)` takes a rate, as `dist.Gamma` does; `cauchy` is `dist.Cauchy`.
- A `<lower=0>` parameter with a symmetric prior centred at 0 (`sigma ~ cauchy(0, 2.5)`)
  has that prior truncated to the positive half-line: `HalfCauchy`, `HalfNormal`. They
  differ from Stan's untruncated density by a constant (log 2), which does not change
  the posterior.
- A parameter with no sampling statement has a flat (improper) prior on its declared
  support: numpyro's `ImproperUniform(support, batch_shape, event_shape)` (log density
  0 on the support). It cannot be drawn, so these models are run from a uniform start
  on the real line (`run_nuts`' default), as Stan starts its chains.
- `transformed parameters` that the reference reports are `ppl.deterministic` sites.
- A prior numpyro has no traceable distribution for (a normal on an ordered vector, a
  half Student t) is written as Stan writes it: an `ImproperUniform` site on the support plus the
  log density as a `ppl.factor`.

Addresses are Stan's parameter names; `Posterior.parameters` maps draws to the
reference's element names (`beta[1]`, 1-based).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions import constraints

import ppl


__all__ = ["Posterior", "POSTERIORS"]


@dataclasses.dataclass(frozen=True)
class Posterior:
    """One reference posterior: its model, how to call it on the JSON data, and how
    to name its draws as the reference does.

    - `args(data)`: the model's argument tuple built from the JSON `data` dict;
    - `observations(data)`: constraints for inference (empty: data are `obs=` sites);
    - `parameters(samples)`: `{stan_name: array [chains, draws]}` for every site in
      `reported`, vector sites split into `name[1]`, `name[2]`, ...
    """

    name: str
    model: ppl.GenerativeFunction
    args: Callable[[dict], tuple]
    reported: tuple[str, ...]
    observations: Callable[[dict], dict] = lambda data: {}

    def parameters(self, samples) -> dict[str, np.ndarray]:
        """Draws `samples[address]` (`[chains, draws, ...]`) under the reference's names."""
        out = {}
        for address in self.reported:
            x = np.asarray(samples[address])
            if x.ndim == 2:
                out[address] = x
                continue
            for index in np.ndindex(*x.shape[2:]):
                label = ",".join(str(i + 1) for i in index)
                out[f"{address}[{label}]"] = x[(slice(None), slice(None), *index)]
        return out


def _real(x) -> jax.Array:
    """Data as an array of the default float dtype (float64 under `jax_enable_x64`)."""
    return jnp.asarray(np.asarray(x, dtype=np.float64), dtype=float)


def _flat_real(*shape) -> dist.ImproperUniform:
    return dist.ImproperUniform(constraints.real, shape, ())


def _flat_positive(*shape) -> dist.ImproperUniform:
    return dist.ImproperUniform(constraints.positive, shape, ())


# -- eight_schools-eight_schools_noncentered -------------------------------------------------------


@ppl.gen
def eight_schools_noncentered(J: int, y, sigma):
    """theta_trans ~ N(0, 1), mu ~ N(0, 5), tau ~ half-Cauchy(5); theta = mu + tau theta_trans;
    y ~ N(theta, sigma)."""
    theta_trans = ppl.sample("theta_trans", dist.Normal(0.0, 1.0).expand((J,)))
    mu = ppl.sample("mu", dist.Normal(0.0, 5.0))
    tau = ppl.sample("tau", dist.HalfCauchy(5.0))
    theta = ppl.deterministic("theta", theta_trans * tau + mu)
    return ppl.sample("y", dist.Normal(theta, sigma), obs=y)


# -- arK-arK ---------------------------------------------------------------------------------------


@ppl.gen
def ark(K: int, T: int, y):
    """AR(K): y[t] ~ N(alpha + sum_k beta[k] y[t-k], sigma) for t > K; alpha, beta ~ N(0, 10),
    sigma ~ half-Cauchy(2.5)."""
    alpha = ppl.sample("alpha", dist.Normal(0.0, 10.0))
    beta = ppl.sample("beta", dist.Normal(0.0, 10.0).expand((K,)))
    sigma = ppl.sample("sigma", dist.HalfCauchy(2.5))
    # lags[t - K, k - 1] = y[t - k] (0-based t = K..T-1, k = 1..K)
    t = np.arange(K, T)[:, None]
    k = np.arange(1, K + 1)[None, :]
    mu = alpha + y[t - k] @ beta
    return ppl.sample("y", dist.Normal(mu, sigma), obs=y[K:])


# -- garch-garch11 ---------------------------------------------------------------------------------


@ppl.gen
def garch11(T: int, y, sigma1):
    """GARCH(1,1): sigma[1] = sigma1, sigma[t]^2 = alpha0 + alpha1 (y[t-1] - mu)^2 + beta1 sigma[t-1]^2;
    y ~ N(mu, sigma). Flat priors: mu on R, alpha0 > 0, alpha1 in (0, 1), beta1 in (0, 1 - alpha1).

    Stan's `<lower=0, upper=(1 - alpha1)>` with no prior is flat on that interval (density 1,
    not 1 / (1 - alpha1)): `ImproperUniform` with the dependent interval, not `Uniform`."""
    mu = ppl.sample("mu", _flat_real())
    alpha0 = ppl.sample("alpha0", _flat_positive())
    alpha1 = ppl.sample("alpha1", dist.Uniform(0.0, 1.0))  # flat on (0, 1): density 1 exactly
    beta1 = ppl.sample("beta1", dist.ImproperUniform(constraints.interval(0.0, 1.0 - alpha1), (), ()))

    def step(sigma_prev, y_prev):
        sigma_t = jnp.sqrt(alpha0 + alpha1 * jnp.square(y_prev - mu) + beta1 * jnp.square(sigma_prev))
        return sigma_t, sigma_t

    sigma1 = jnp.asarray(sigma1, dtype=y.dtype)
    _, rest = jax.lax.scan(step, sigma1, y[: T - 1])
    sigma = jnp.concatenate([sigma1[None], rest])
    return ppl.sample("y", dist.Normal(mu, sigma), obs=y)


# -- earnings-logearn_height -----------------------------------------------------------------------


@ppl.gen
def logearn_height(earn, height):
    """log(earn) ~ N(beta[1] + beta[2] height, sigma); flat priors on beta and sigma > 0."""
    beta = ppl.sample("beta", _flat_real(2))
    sigma = ppl.sample("sigma", _flat_positive())
    return ppl.sample("log_earn", dist.Normal(beta[0] + beta[1] * height, sigma), obs=jnp.log(earn))


# -- kidiq-kidscore_momhsiq ------------------------------------------------------------------------


@ppl.gen
def kidscore_momhsiq(kid_score, mom_iq, mom_hs):
    """kid_score ~ N(beta[1] + beta[2] mom_hs + beta[3] mom_iq, sigma); flat beta,
    sigma ~ half-Cauchy(2.5)."""
    beta = ppl.sample("beta", _flat_real(3))
    sigma = ppl.sample("sigma", dist.HalfCauchy(2.5))
    mean = beta[0] + beta[1] * mom_hs + beta[2] * mom_iq
    return ppl.sample("kid_score", dist.Normal(mean, sigma), obs=kid_score)


# -- mesquite-logmesquite_logvolume ----------------------------------------------------------------


@ppl.gen
def logmesquite_logvolume(weight, diam1, diam2, canopy_height):
    """log(weight) ~ N(beta[1] + beta[2] log(diam1 diam2 canopy_height), sigma); flat priors."""
    beta = ppl.sample("beta", _flat_real(2))
    sigma = ppl.sample("sigma", _flat_positive())
    log_canopy_volume = jnp.log(diam1 * diam2 * canopy_height)
    mean = beta[0] + beta[1] * log_canopy_volume
    return ppl.sample("log_weight", dist.Normal(mean, sigma), obs=jnp.log(weight))


# -- nes1980-nes -----------------------------------------------------------------------------------


@ppl.gen
def nes(partyid7, real_ideo, race_adj, educ1, gender, income, age_discrete):
    """partyid7 ~ N(X beta, sigma) with 9 predictors (age as three indicators of
    `age_discrete` = 2, 3, 4); flat priors on beta and sigma > 0."""
    beta = ppl.sample("beta", _flat_real(9))
    sigma = ppl.sample("sigma", _flat_positive())
    dtype = partyid7.dtype
    age30_44 = (age_discrete == 2).astype(dtype)
    age45_64 = (age_discrete == 3).astype(dtype)
    age65up = (age_discrete == 4).astype(dtype)
    mean = (beta[0] + beta[1] * real_ideo + beta[2] * race_adj + beta[3] * age30_44 + beta[4] * age45_64
            + beta[5] * age65up + beta[6] * educ1 + beta[7] * gender + beta[8] * income)
    return ppl.sample("partyid7", dist.Normal(mean, sigma), obs=partyid7)


# -- sblrc-blr -------------------------------------------------------------------------------------


@ppl.gen
def blr(D: int, X, y):
    """y ~ N(X beta, sigma); beta ~ N(0, 10), sigma ~ half-normal(10)."""
    beta = ppl.sample("beta", dist.Normal(0.0, 10.0).expand((D,)))
    sigma = ppl.sample("sigma", dist.HalfNormal(10.0))
    return ppl.sample("y", dist.Normal(X @ beta, sigma), obs=y)


# -- low_dim_gauss_mix-low_dim_gauss_mix -----------------------------------------------------------


@ppl.gen
def low_dim_gauss_mix(N: int, y):
    """y[n] ~ theta N(mu[1], sigma[1]) + (1 - theta) N(mu[2], sigma[2]), mu ordered.
    Priors: mu ~ N(0, 2) on the ordered pair, sigma ~ half-normal(2), theta ~ Beta(5, 5).

    `mu ~ normal(0, 2)` on an `ordered[2]` adds the normal log density on the ordered
    set: a flat ordered site plus that density as a factor (Stan's unnormalized target).
    `target += log_mix(...)` is the mixture's log density, an `obs=` site here."""
    mu = ppl.sample("mu", dist.ImproperUniform(constraints.ordered_vector, (), (2,)))
    ppl.factor("mu_prior", jnp.sum(dist.Normal(0.0, 2.0).log_prob(mu)))
    sigma = ppl.sample("sigma", dist.HalfNormal(2.0).expand((2,)))
    theta = ppl.sample("theta", dist.Beta(5.0, 5.0))
    weights = dist.Categorical(probs=jnp.stack([theta, 1.0 - theta]))
    mixture = dist.MixtureSameFamily(weights, dist.Normal(mu, sigma))
    return ppl.sample("y", mixture.expand((N,)), obs=y)


# -- gp_pois_regr-gp_pois_regr ---------------------------------------------------------------------


@ppl.gen
def gp_pois_regr(N: int, x, k):
    """Latent GP, Poisson counts: f = L f_tilde with L L' = alpha^2 exp(-(x_i - x_j)^2 / (2 rho^2))
    + 1e-10 I, k ~ Poisson(exp(f)); rho ~ Gamma(25, rate 4), alpha ~ half-normal(2), f_tilde ~ N(0, 1).

    Needs float64 (`jax.config.update("jax_enable_x64", True)`), as Stan computes: for
    rho near its posterior mean the covariance's smallest eigenvalue is ~1e-8 of its
    largest, below float32's resolution, and the float32 Cholesky factor is NaN."""
    rho = ppl.sample("rho", dist.Gamma(25.0, 4.0))
    alpha = ppl.sample("alpha", dist.HalfNormal(2.0))
    f_tilde = ppl.sample("f_tilde", dist.Normal(0.0, 1.0).expand((N,)))
    cov = jnp.square(alpha) * jnp.exp(-jnp.square(x[:, None] - x[None, :]) / (2.0 * jnp.square(rho)))
    cov = cov + 1e-10 * jnp.eye(N, dtype=cov.dtype)
    f = ppl.deterministic("f", jnp.linalg.cholesky(cov) @ f_tilde)
    return ppl.sample("k", dist.Poisson(jnp.exp(f)), obs=k)


# -- kilpisjarvi_mod-kilpisjarvi -------------------------------------------------------------------


@ppl.gen
def kilpisjarvi(x, y, pmualpha, psalpha, pmubeta, psbeta):
    """y ~ N(alpha + beta x, sigma); alpha ~ N(pmualpha, psalpha), beta ~ N(pmubeta, psbeta),
    flat sigma > 0. (The data's `xpred` is not used by the model.)"""
    alpha = ppl.sample("alpha", dist.Normal(pmualpha, psalpha))
    beta = ppl.sample("beta", dist.Normal(pmubeta, psbeta))
    sigma = ppl.sample("sigma", _flat_positive())
    return ppl.sample("y", dist.Normal(alpha + beta * x, sigma), obs=y)


# -- diamonds-diamonds -----------------------------------------------------------------------------


@ppl.gen
def diamonds(Y, X, prior_only: int):
    """brms regression on centred predictors: Y ~ N(Intercept + Xc b, sigma), Xc = X[:, 1:]
    minus its column means; b ~ N(0, 1), Intercept ~ t(3, 8, 10), sigma ~ t(3, 0, 10)
    truncated to sigma > 0. `b_Intercept = Intercept - means_X . b` is Stan's generated quantity.

    sigma's prior is Stan's `target +=` as written: a flat positive site plus the factor
    `student_t_lpdf(sigma | 3, 0, 10) - student_t_lccdf(0 | 3, 0, 10)` (the lccdf is log 1/2).
    `dist.FoldedDistribution(dist.StudentT(...))` has that density, but
    `inference.unconstrained` wraps a site's distribution in `TransformedDistribution`,
    which numpyro flattens into the folded distribution's base and `AbsTransform`,
    losing its `log_prob` (NotImplementedError); `TruncatedDistribution` needs
    tensorflow_probability to sample a Student t."""
    means_x = jnp.mean(X[:, 1:], axis=0)
    xc = X[:, 1:] - means_x
    b = ppl.sample("b", dist.Normal(0.0, 1.0).expand((xc.shape[1],)))
    intercept = ppl.sample("Intercept", dist.StudentT(3.0, 8.0, 10.0))
    sigma = ppl.sample("sigma", _flat_positive())
    ppl.factor("sigma_prior", dist.StudentT(3.0, 0.0, 10.0).log_prob(sigma) + jnp.log(2.0))
    ppl.deterministic("b_Intercept", intercept - means_x @ b)
    if not prior_only:
        ppl.sample("Y", dist.Normal(intercept + xc @ b, sigma), obs=Y)


# -- the registry ----------------------------------------------------------------------------------

_POSTERIORS = [
    Posterior(
        "eight_schools-eight_schools_noncentered", eight_schools_noncentered,
        lambda d: (int(d["J"]), _real(d["y"]), _real(d["sigma"])), ("theta", "mu", "tau"),
    ),
    Posterior(
        "arK-arK", ark, lambda d: (int(d["K"]), int(d["T"]), _real(d["y"])), ("alpha", "beta", "sigma"),
    ),
    Posterior(
        "garch-garch11", garch11, lambda d: (int(d["T"]), _real(d["y"]), _real(d["sigma1"])),
        ("mu", "alpha0", "alpha1", "beta1"),
    ),
    Posterior(
        "earnings-logearn_height", logearn_height, lambda d: (_real(d["earn"]), _real(d["height"])),
        ("beta", "sigma"),
    ),
    Posterior(
        "kidiq-kidscore_momhsiq", kidscore_momhsiq,
        lambda d: (_real(d["kid_score"]), _real(d["mom_iq"]), _real(d["mom_hs"])), ("beta", "sigma"),
    ),
    Posterior(
        "mesquite-logmesquite_logvolume", logmesquite_logvolume,
        lambda d: tuple(_real(d[k]) for k in ("weight", "diam1", "diam2", "canopy_height")),
        ("beta", "sigma"),
    ),
    Posterior(
        "nes1980-nes", nes,
        lambda d: (*(_real(d[k]) for k in ("partyid7", "real_ideo", "race_adj", "educ1", "gender", "income")),
                   jnp.asarray(d["age_discrete"], dtype=jnp.int32)),
        ("beta", "sigma"),
    ),
    Posterior("sblrc-blr", blr, lambda d: (int(d["D"]), _real(d["X"]), _real(d["y"])), ("beta", "sigma")),
    Posterior(
        "low_dim_gauss_mix-low_dim_gauss_mix", low_dim_gauss_mix, lambda d: (int(d["N"]), _real(d["y"])),
        ("mu", "sigma", "theta"),
    ),
    Posterior(
        "gp_pois_regr-gp_pois_regr", gp_pois_regr,
        lambda d: (int(d["N"]), _real(d["x"]), jnp.asarray(d["k"], dtype=jnp.int32)), ("rho", "alpha", "f"),
    ),
    Posterior(
        "kilpisjarvi_mod-kilpisjarvi", kilpisjarvi,
        lambda d: (_real(d["x"]), _real(d["y"]),
                   *(_real(d[k]) for k in ("pmualpha", "psalpha", "pmubeta", "psbeta"))),
        ("alpha", "beta", "sigma"),
    ),
    Posterior(
        "diamonds-diamonds", diamonds, lambda d: (_real(d["Y"]), _real(d["X"]), int(d["prior_only"])),
        ("b", "Intercept", "sigma"),
    ),
]

POSTERIORS: dict[str, Posterior] = {p.name: p for p in _POSTERIORS}
