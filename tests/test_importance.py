"""Importance sampling against closed-form evidence and posteriors (conjugate models).

Tolerances come from the Monte Carlo standard error. For N particles with effective
sample size ESS, the delta method gives sd(log Z_hat) ~= sqrt(1/ESS - 1/N) (the relative
variance of the mean weight). Checks use 5 standard errors (a two-sided normal false
alarm rate of ~6e-7 per check, and the seeds are fixed), plus 1e-4 for float32 rounding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from jax.scipy.special import betaln, gammaln
from jax.scipy.stats import multivariate_normal

import inference
import ppl

N = 20_000
FLOAT32_SLACK = 1e-4


def log_z_se(result):
    return float(jnp.sqrt(1.0 / result.ess - 1.0 / result.num_particles))


def assert_log_evidence(result, exact):
    se = log_z_se(result)
    assert abs(float(result.log_marginal) - float(exact)) < 5 * se + FLOAT32_SLACK, (
        float(result.log_marginal), float(exact), se)


# normal-normal: mu ~ N(0, 1), y_i ~ N(mu, 1)
Y = jnp.array([0.8, 1.3, 0.2, 1.9, 1.1])


@ppl.gen
def normal_normal(n):
    mu = ppl.sample("mu", dist.Normal(0.0, 1.0))
    return ppl.sample("y", dist.Normal(mu, 1.0).expand((n,)))


def normal_normal_exact():
    n = Y.shape[0]
    cov = jnp.eye(n) + jnp.ones((n, n))
    post_var = 1.0 / (1.0 + n)
    return multivariate_normal.logpdf(Y, jnp.zeros(n), cov), post_var * Y.sum(), post_var


def test_normal_normal_evidence_and_posterior_mean():
    res = inference.importance(jax.random.key(1), normal_normal, (5,), {"y": Y}, N)
    log_z, post_mean, post_var = normal_normal_exact()
    assert_log_evidence(res, log_z)
    # self-normalized posterior mean: s.e. ~ posterior sd / sqrt(ESS)
    mean = jnp.sum(res.normalized_weights() * res.traces["mu"])
    assert abs(mean - post_mean) < 5 * jnp.sqrt(post_var / res.ess)
    assert 1.0 <= res.ess <= N


def test_exact_posterior_proposal_gives_constant_weights():
    log_z, post_mean, post_var = normal_normal_exact()

    @ppl.gen
    def posterior():
        ppl.sample("mu", dist.Normal(post_mean, jnp.sqrt(post_var)))

    res = inference.importance(jax.random.key(2), normal_normal, (5,), {"y": Y}, 256, proposal=posterior)
    with pytest.raises(ppl.ArgumentError, match="proposes 'y'"):
        bad = ppl.gen(lambda: ppl.sample("y", dist.Normal(0.0, 1.0).expand((5,))))
        inference.importance(jax.random.key(2), normal_normal, (5,), {"y": Y}, 8, proposal=bad)
    # p(y, mu) / p(mu | y) = p(y) for every particle: exact up to float32 rounding
    np.testing.assert_allclose(res.log_weights, log_z, atol=2e-4)
    np.testing.assert_allclose(res.ess, 256, rtol=1e-3)


def test_beta_binomial_evidence():
    a, b, n, k = 2.0, 3.0, 20, 7

    @ppl.gen
    def beta_binomial():
        p = ppl.sample("p", dist.Beta(a, b))
        return ppl.sample("k", dist.Binomial(n, p))

    res = inference.importance(jax.random.key(3), beta_binomial, (), {"k": k}, N)
    log_choose = gammaln(n + 1.0) - gammaln(k + 1.0) - gammaln(n - k + 1.0)
    assert_log_evidence(res, log_choose + betaln(k + a, n - k + b) - betaln(a, b))


def test_gamma_poisson_evidence():
    alpha, beta = 3.0, 1.0
    ys = jnp.array([2, 4, 3, 5, 1])

    @ppl.gen
    def gamma_poisson():
        rate = ppl.sample("rate", dist.Gamma(alpha, beta))
        return ppl.sample("y", dist.Poisson(rate).expand((5,)))

    res = inference.importance(jax.random.key(4), gamma_poisson, (), {"y": ys}, N)
    s, n = ys.sum(), ys.shape[0]
    exact = (
        -gammaln(ys + 1.0).sum() + alpha * jnp.log(beta) - gammaln(alpha)
        + gammaln(alpha + s) - (alpha + s) * jnp.log(beta + n)
    )
    assert_log_evidence(res, exact)


def test_traces_store_shared_leaves_once_and_expand_on_access():
    res = inference.importance(jax.random.key(5), normal_normal, (5,), {"y": Y}, 64)
    assert res.traces["mu"].shape == (64,)
    assert res.traces["y"].shape == (64, 5)
    np.testing.assert_array_equal(res.traces["y"][17], Y)
    packed = jax.tree.leaves(res._packed)
    assert max(leaf.size for leaf in packed) <= 64  # y (5 values) kept once, not 64 times


def test_resampling_frequencies_follow_the_weights():
    res = inference.importance(jax.random.key(6), normal_normal, (5,), {"y": Y}, 4)
    draws = res.resample(jax.random.key(7), 40_000)
    idx = jnp.argmin(jnp.abs(draws["mu"][:, None] - res.traces["mu"][None, :]), axis=1)
    freq = jnp.bincount(idx, length=4) / 40_000
    p = res.normalized_weights()
    # multinomial counts: sd of each frequency sqrt(p(1-p)/n)
    assert jnp.all(jnp.abs(freq - p) < 5 * jnp.sqrt(p * (1 - p) / 40_000) + 1e-6)
    assert draws["y"].shape == (40_000, 5)


def test_compiles_once_for_new_data_of_the_same_shape():
    calls = []

    @ppl.gen
    def counted(n):
        calls.append(1)
        mu = ppl.sample("mu", dist.Normal(0.0, 1.0))
        return ppl.sample("y", dist.Normal(mu, 1.0).expand((n,)))

    inference.importance(jax.random.key(0), counted, (5,), {"y": Y}, 32)
    traced = len(calls)
    res = inference.importance(jax.random.key(1), counted, (5,), {"y": Y + 1.0}, 32)
    assert len(calls) == traced  # no retrace, so no recompile
    assert res.log_weights.shape == (32,)


def test_same_key_same_result_and_jit_composes():
    a = inference.importance(jax.random.key(9), normal_normal, (5,), {"y": Y}, 128)
    b = inference.importance(jax.random.key(9), normal_normal, (5,), {"y": Y}, 128)
    np.testing.assert_array_equal(a.log_weights, b.log_weights)
    f = jax.jit(lambda k, y: inference.importance(k, normal_normal, (5,), {"y": y}, 128).log_marginal)
    np.testing.assert_allclose(f(jax.random.key(9), Y), a.log_marginal, rtol=1e-6)


def test_switch_mixture_against_the_enumerated_posterior():
    # k ~ Categorical(0.3, 0.7); x | k ~ N(-2, 1) or N(2, 1.5) via ppl.switch; x = 0.5.
    @ppl.gen
    def left():
        return ppl.sample("x", dist.Normal(-2.0, 1.0))

    @ppl.gen
    def right():
        return ppl.sample("x", dist.Normal(2.0, 1.5))

    @ppl.gen
    def mixture():
        k = ppl.sample("k", dist.Categorical(jnp.array([0.3, 0.7])))
        return ppl.sample("component", ppl.switch(left, right), k)

    joint = jnp.log(jnp.array([0.3, 0.7])) + jnp.array(
        [dist.Normal(-2.0, 1.0).log_prob(0.5), dist.Normal(2.0, 1.5).log_prob(0.5)]
    )
    exact_log_z = jax.scipy.special.logsumexp(joint)
    exact_p1 = jnp.exp(joint[1] - exact_log_z)
    res = inference.importance(jax.random.key(11), mixture, (), {("component", "x"): 0.5}, N)
    assert_log_evidence(res, exact_log_z)
    p1 = jnp.sum(res.normalized_weights() * (res.traces["k"] == 1))
    # self-normalized estimate of a probability: s.e. ~ sqrt(p (1 - p) / ESS)
    assert abs(p1 - exact_p1) < 5 * jnp.sqrt(exact_p1 * (1 - exact_p1) / res.ess)
