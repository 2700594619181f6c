"""Enumeration Gibbs and kernel mixtures against an enumerated posterior.

The model: mu ~ N(0, 2^2); z_i ~ Bernoulli(0.3), i < 4; y_i ~ N(mu + 3 z_i, 1).
Given z, y - 3 z = mu 1 + noise, so p(y | z) = N(y - 3 z; 0, I + 4 1 1^T) and
mu | y, z is Gaussian: the exact posterior is a sum over the 16 values of z.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from numpyro.diagnostics import effective_sample_size

import inference
import ppl

pytestmark = pytest.mark.filterwarnings("ignore::inference.ConvergenceWarning")

Y = jnp.array([0.2, 3.1, 2.0, -0.5])
PRIOR_SD, P1 = 2.0, 0.3


@ppl.gen
def mixture_model():
    mu = ppl.sample("mu", dist.Normal(0.0, PRIOR_SD))
    z = ppl.sample("z", dist.Bernoulli(jnp.full(4, P1)))
    return ppl.sample("y", dist.Normal(mu + 3.0 * z, 1.0))


@ppl.gen
def point(mu):
    z = ppl.sample("z", dist.Bernoulli(P1))
    return ppl.sample("y", dist.Normal(mu + 3.0 * z, 1.0))


@ppl.gen
def mixture_model_vmap():
    """The same model with the points as a `ppl.vmap`: z lives at ("points", "z")."""
    mu = ppl.sample("mu", dist.Normal(0.0, PRIOR_SD))
    return ppl.sample("points", ppl.vmap(point, in_axes=(0,)), jnp.zeros(4) + mu)


def exact_posterior():
    """P(z_2 = 1 | y) (y_2 = 2.0 is ambiguous) and E[mu | y], by enumerating z."""
    log_post, mean_mu = [], []
    y = np.asarray(Y, dtype=np.float64)
    for z in itertools.product([0, 1], repeat=4):
        a = np.ones(4)
        r = y - 3.0 * np.array(z)
        cov = np.eye(4) + PRIOR_SD**2 * np.outer(a, a)
        _, logdet = np.linalg.slogdet(cov)
        log_lik = -0.5 * (r @ np.linalg.solve(cov, r) + logdet + 4 * np.log(2 * np.pi))
        log_prior = sum(np.log(P1) if zi else np.log(1 - P1) for zi in z)
        log_post.append(log_lik + log_prior)
        precision = 1 / PRIOR_SD**2 + a @ a
        mean_mu.append((a @ r) / precision)
    w = np.exp(np.array(log_post) - max(log_post))
    w /= w.sum()
    z0 = np.array([z[2] for z in itertools.product([0, 1], repeat=4)])
    return float(w @ z0), float(w @ np.array(mean_mu))


def check(samples, z_address="z"):
    p_z0, e_mu = exact_posterior()
    z0 = np.asarray(samples[z_address][..., 2], dtype=float)
    mu = np.asarray(samples["mu"])
    # 5 Monte Carlo standard errors, sd / sqrt(bulk ESS) of each estimate.
    for draws, exact in ((z0, p_z0), (mu, e_mu)):
        ess = float(effective_sample_size(draws))
        assert ess > 100
        assert abs(draws.mean() - exact) < 5 * draws.std() / np.sqrt(ess), (draws.mean(), exact, ess)


@pytest.mark.parametrize("model, z", [(mixture_model, "z"), (mixture_model_vmap, ("points", "z"))])
def test_gibbs_with_nuts_matches_the_enumerated_posterior(key, model, z):
    y_address = "y" if z == "z" else ("points", "y")
    kernel = inference.cycle(inference.gibbs(z), inference.nuts(selection="mu"))
    samples = inference.run_mcmc(key, kernel, model, (), {y_address: Y}, num_warmup=300,
                                 num_samples=1000, num_chains=4, progress_bar=False)
    check(samples, z)


def test_mixture_of_gibbs_and_hmc_matches_the_enumerated_posterior(key):
    kernel = inference.mixture(
        [inference.gibbs("z"), inference.hmc(step_size=0.3, num_steps=8, adapt_step_size=False,
                                             adapt_mass_matrix=False, selection="mu")], [0.5, 0.5])
    samples = inference.run_mcmc(key, kernel, mixture_model, (), {"y": Y}, num_warmup=200,
                                 num_samples=2000, num_chains=4, progress_bar=False)
    check(samples)


def test_gibbs_conditional_is_exact_for_one_step(key):
    """One Gibbs step on z_0 alone: its conditional equals the normalized joint over the
    two values (computed with assess)."""

    @ppl.gen
    def model():
        k = ppl.sample("k", dist.Categorical(jnp.array([0.2, 0.5, 0.3])))
        return ppl.sample("y", dist.Normal(jnp.array([-1.0, 0.0, 2.0])[k], 0.7))

    trace, _ = model.generate(key, {"y": 1.2, "k": 0}, ())
    kernel = inference.gibbs("k")
    state = kernel.init(trace, observed={"y": 1.2})
    _, info = kernel.step(key, state)
    joint = jnp.array([model.assess({"k": k, "y": 1.2}, ())[0] for k in range(3)])
    exact = np.asarray(jax.nn.softmax(joint))
    np.testing.assert_allclose(info.log_probs[0], np.log(exact), rtol=1e-5, atol=1e-5)
    # The draws follow it: frequencies over 20,000 steps within 5 binomial s.e.
    n = 20_000
    states, _ = jax.jit(jax.vmap(kernel.step, in_axes=(0, None)))(jax.random.split(key, n), state)
    freq = np.bincount(np.asarray(states.trace["k"]), minlength=3) / n
    assert np.all(np.abs(freq - exact) < 5 * np.sqrt(exact * (1 - exact) / n)), (freq, exact)


def test_gibbs_errors_name_the_site(key):
    trace, _ = mixture_model.generate(key, {"y": Y}, ())
    with pytest.raises(ppl.ArgumentError, match="'mu'.*not finite"):
        inference.gibbs("mu").init(trace, observed={"y": Y})
    with pytest.raises(ppl.ArgumentError, match="no random choice at 'zz'"):
        inference.gibbs("zz").init(trace, observed={"y": Y})
    with pytest.raises(ppl.ArgumentError, match="one address"):
        inference.gibbs(["z", "mu"])
    with pytest.raises(ppl.ArgumentError, match="sum"):
        inference.mixture([inference.gibbs("z")], [0.5])
