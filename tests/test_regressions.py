"""Regression tests for wrong answers found by review; each failed on the earlier core.

(The switch findings live in test_switch.py, the key collisions in test_keys.py.)
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from conftest import assert_close

import inference
import ppl


@ppl.gen
def every_kind(y):
    """One site of each kind: latent, obs=, factor, reward, deterministic, nested call."""
    mu = ppl.sample("mu", dist.Normal(0.0, 1.0))
    ppl.sample("y", dist.Normal(mu, 1.0), obs=y)
    ppl.factor("penalty", -0.5 * mu**2)
    ppl.reward("prm", lambda m: jax.nn.sigmoid(m), mu, beta=2.0)
    ppl.deterministic("twice", 2.0 * mu)
    return ppl.sample("sub", inner, mu)


@ppl.gen
def inner(mu):
    z = ppl.sample("z", dist.Normal(mu, 1.0))
    ppl.sample("w", dist.Normal(z, 1.0), obs=0.25)
    return z


def _exact_score(mu, z, y):
    return (
        dist.Normal(0.0, 1.0).log_prob(mu) + dist.Normal(mu, 1.0).log_prob(y) - 0.5 * mu**2
        + 2.0 * jnp.log(jax.nn.sigmoid(mu)) + dist.Normal(mu, 1.0).log_prob(z)
        + dist.Normal(z, 1.0).log_prob(0.25)
    )


def test_choices_hold_random_choices_only_and_round_trip(key):
    tr = every_kind.simulate(key, (0.5,))
    assert sorted(tr.choices.addresses()) == [("mu",), ("sub", "z")]
    assert_close(tr.score, _exact_score(tr["mu"], tr["sub", "z"], 0.5))
    # the other sites are readable from the trace
    assert_close(tr["y"], 0.5)
    assert_close(tr["twice"], 2 * tr["mu"])
    assert_close(tr["prm"], jax.nn.sigmoid(tr["mu"]))
    assert_close(tr["sub", "w"], 0.25)
    # generate with every choice reproduces the score, eagerly and under jit
    for gen in (every_kind.generate, jax.jit(every_kind.generate)):
        new, w = gen(key, tr.choices, (0.5,))
        assert_close(w, tr.score)
        assert_close(new.score, tr.score)
    lp, _ = every_kind.assess(tr.choices, (0.5,))
    assert_close(lp, tr.score)


@pytest.mark.parametrize(
    "address, message",
    [
        ("y", "observed with obs="),
        ("penalty", "is a factor"),
        ("prm", "is a reward factor"),
        ("twice", "deterministic value"),
        (("sub", "w"), "observed with obs="),
    ],
)
def test_naming_a_site_that_is_not_a_choice_is_an_error(key, address, message):
    tr = every_kind.simulate(key, (0.5,))
    given = {address: 0.1, "mu": 0.0, ("sub", "z"): 0.0}
    with pytest.raises(ppl.AddressError, match=message):
        every_kind.assess(given, (0.5,))
    with pytest.raises(ppl.AddressError, match=message):
        every_kind.generate(key, given, (0.5,))
    with pytest.raises(ppl.AddressError, match=message):
        every_kind.update(key, tr, {address: 0.1}, (0.5,))


def test_update_weight_counts_every_kind(key):
    tr = every_kind.simulate(key, (0.5,))
    new, w, discard = every_kind.update(key, tr, {"mu": 0.3}, (0.7,))
    assert_close(new.score, _exact_score(0.3, tr["sub", "z"], 0.7))
    assert_close(w, new.score - tr.score)
    assert_close(discard["mu"], tr["mu"])


def test_resample_returns_n_traces_when_every_leaf_is_shared(key):
    @ppl.gen
    def fixed():
        return ppl.sample("x", dist.Normal(0.0, 1.0))

    res = inference.importance(key, fixed, (), {"x": 0.5}, 100)
    out = res.resample(key, 10)
    assert out["x"].shape == (10,) and out.score.shape == (10,)


def test_positive_infinite_weights_raise_naming_the_site(key):
    @ppl.gen
    def pole():
        return ppl.sample("p", dist.Beta(0.5, 0.5))

    with pytest.raises(ppl.InferenceError, match=r"\+inf.*'p'"):
        inference.importance(key, pole, (), {"p": 0.0}, 10)

    @ppl.gen
    def infinite_factor():
        ppl.sample("x", dist.Normal(0.0, 1.0))
        ppl.factor("f", jnp.inf)

    with pytest.raises(ppl.InferenceError, match=r"\+inf.*'f'"):
        inference.importance(key, infinite_factor, (), {}, 10)


@ppl.gen
def counts(rate):
    return ppl.sample("k", dist.Poisson(rate))


def test_fractional_counts_are_refused_not_floored(key):
    with pytest.raises(ppl.ObservationError, match="'k' has non-integer values"):
        counts.generate(key, {"k": 1.5}, (2.0,))
    with pytest.raises(ppl.ObservationError, match="'k' has non-integer values"):
        inference.importance(key, counts, (2.0,), {"k": 1.5}, 10)
    # traced: the log weight is -inf (1.5 is not a count), not the weight of k = 1
    _, w = jax.jit(counts.generate)(key, {"k": jnp.float32(1.5)}, (2.0,))
    assert w == -jnp.inf
    _, w1 = jax.jit(counts.generate)(key, {"k": jnp.float32(1.0)}, (2.0,))
    assert_close(w1, dist.Poisson(2.0).log_prob(1))


def test_selection_naming_no_address_is_an_error(key):
    @ppl.gen
    def model():
        mu = ppl.sample("mu", dist.Normal(0.0, 1.0))
        return ppl.sample("sub", inner, mu)

    tr = model.simulate(key, ())
    with pytest.raises(ppl.UnknownAddressError, match=r"'mue'.*Did you mean 'mu'\?"):
        model.regenerate(key, tr, ppl.select("mue"))
    with pytest.raises(ppl.UnknownAddressError, match=r"Did you mean \('sub', 'z'\)\?"):
        model.regenerate(key, tr, ppl.select(("sub", "zz")))
    with pytest.raises(ppl.UnknownAddressError, match="'nope'"):
        model.project(tr, ppl.select("nope"))
    # prefixes of real addresses are fine
    model.regenerate(key, tr, ppl.select("sub"))


def test_complement_of_the_empty_selection_holds_everything(key):
    everything = ~ppl.select()
    assert () in everything and "mu" in everything and ("sub", "z") in everything
    tr = every_kind.simulate(key, (0.5,))
    assert_close(every_kind.project(tr, everything), tr.score)


def test_masked_off_assess_has_zero_value_and_zero_gradient():
    @ppl.gen
    def body(x):
        ppl.factor("root", jnp.sqrt(x))
        return ppl.sample("z", dist.Normal(0.0, 1.0))

    masked = ppl.mask(body)
    for flag in (False, jnp.array(False)):
        value, grad = jax.value_and_grad(lambda x: masked.assess({"z": 0.1}, (flag, x))[0])(0.0)
        assert value == 0.0 and grad == 0.0
    grad_on = jax.grad(lambda x: masked.assess({"z": 0.1}, (True, x))[0])(4.0)
    assert_close(grad_on, 0.25)  # d sqrt(x) / dx at 4


def test_python_int_arguments_stay_static_in_loops(key):
    @ppl.gen
    def model(n):
        mu = ppl.sample("mu", dist.Normal(0.0, 1.0))
        return ppl.sample("y", dist.Normal(jnp.full((n,), mu), 1.0))

    tr = model.simulate(key, (3,))

    def step(trace, k):
        new, _ = model.regenerate(k, trace, ppl.select("mu"))
        return new, new["mu"]

    final, mus = jax.lax.scan(step, tr, jax.random.split(key, 4))
    assert final.args == (3,) and final["y"].shape == (3,) and mus.shape == (4,)
    batch = jax.vmap(model.simulate, in_axes=(0, None))(jax.random.split(key, 5), (3,))
    assert batch.args == (3,) and batch["y"].shape == (5, 3)


def test_evidence_of_every_kind_matches_quadrature(key):
    # p(y=0.5, w=0.25, factor, reward) by quadrature over mu and z (both Gaussian in z:
    # integrate z exactly: N(0.25; mu, 2)); importance must agree within 5 s.e.
    grid = np.linspace(-8, 8, 20001)
    dx = grid[1] - grid[0]
    mu = jnp.asarray(grid)
    integrand = jnp.exp(
        dist.Normal(0.0, 1.0).log_prob(mu) + dist.Normal(mu, 1.0).log_prob(0.5) - 0.5 * mu**2
        + 2.0 * jnp.log(jax.nn.sigmoid(mu)) + dist.Normal(mu, math.sqrt(2.0)).log_prob(0.25)
    )
    exact = math.log(float(jnp.sum(integrand)) * dx)
    res = inference.importance(key, every_kind, (0.5,), {}, 20_000)
    se = math.sqrt(1.0 / float(res.ess) - 1.0 / 20_000)
    assert abs(float(res.log_marginal) - exact) < 5 * se


def test_importance_inside_a_users_jit_with_closed_over_observations(key):
    @ppl.gen
    def model():
        rate = ppl.sample("rate", dist.Gamma(2.0, 2.0))
        return ppl.sample("wait", dist.Exponential(rate).expand((3,)))

    waits = jnp.array([0.5, 1.0, 2.0])  # a concrete constant inside the traced function
    run = jax.jit(lambda k: inference.importance(k, model, (), {"wait": waits}, 64).log_marginal)
    direct = inference.importance(key, model, (), {"wait": waits}, 64).log_marginal
    assert_close(run(key), direct)


@pytest.mark.slow
def test_evidence_of_every_kind_matches_quadrature_thorough(key):
    grid = np.linspace(-8, 8, 20001)
    mu = jnp.asarray(grid)
    integrand = jnp.exp(
        dist.Normal(0.0, 1.0).log_prob(mu) + dist.Normal(mu, 1.0).log_prob(0.5) - 0.5 * mu**2
        + 2.0 * jnp.log(jax.nn.sigmoid(mu)) + dist.Normal(mu, math.sqrt(2.0)).log_prob(0.25)
    )
    exact = math.log(float(jnp.sum(integrand)) * (grid[1] - grid[0]))
    res = inference.importance(key, every_kind, (0.5,), {}, 1_000_000)
    se = math.sqrt(1.0 / float(res.ess) - 1.0 / 1_000_000)
    assert abs(float(res.log_marginal) - exact) < 5 * se
