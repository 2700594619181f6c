"""The DSL against hand-computed numpyro densities, and under jit / vmap / scan / grad."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from conftest import assert_close

import ppl
from models import regression


XS = jnp.linspace(-1.0, 1.0, 7)


def regression_log_joint(slope, noise, ys, xs=XS):
    """Hand-written with numpyro log_prob sums: the truth the DSL must reproduce."""
    return (
        dist.Normal(0.0, 1.0).log_prob(slope)
        + dist.HalfNormal(1.0).log_prob(noise)
        + dist.Normal(slope * xs, noise).log_prob(ys).sum()
    )


def test_simulate_score_is_numpyro_log_joint(key):
    tr = regression.simulate(key, (XS,))
    assert tr.choices.addresses() == [("noise",), ("slope",), ("ys",)]
    assert tr["ys"].shape == (7,)
    assert_close(tr.score, regression_log_joint(tr["slope"], tr["noise"], tr["ys"]))
    assert_close(tr.retval, tr["ys"])
    assert tr.args[0] is XS


def test_assess_generate_update_regenerate_values(key):
    tr = regression.simulate(key, (XS,))
    lp, retval = regression.assess(tr.choices, (XS,))
    assert_close(lp, tr.score)

    # generate with the data: weight = log p(ys | slope, noise) for the prior draws
    ys = jnp.sin(XS)
    gtr, w = regression.generate(key, {"ys": ys}, (XS,))
    assert_close(w, dist.Normal(gtr["slope"] * XS, gtr["noise"]).log_prob(ys).sum())
    assert_close(gtr.score, regression_log_joint(gtr["slope"], gtr["noise"], ys))

    # update slope: weight = new score - old score, discard = old slope
    utr, uw, discard = regression.update(key, gtr, {"slope": 0.25}, (XS,))
    assert_close(utr["slope"], 0.25)
    assert_close(uw, regression_log_joint(0.25, gtr["noise"], ys) - gtr.score)
    assert_close(discard["slope"], gtr["slope"])

    # regenerate noise: slope and ys kept, weight = change in the unselected densities
    rtr, rw = regression.regenerate(jax.random.key(7), utr, ppl.select("noise"))
    assert_close(rtr["slope"], 0.25)
    assert_close(rtr["ys"], ys)
    assert not np.allclose(rtr["noise"], utr["noise"])
    expected = dist.Normal(0.25 * XS, rtr["noise"]).log_prob(ys).sum() - dist.Normal(
        0.25 * XS, utr["noise"]
    ).log_prob(ys).sum()
    assert_close(rw, expected, rtol=1e-4)


def test_same_key_same_trace_and_sites_have_independent_keys(key):
    a, b = regression.simulate(key, (XS,)), regression.simulate(key, (XS,))
    assert np.array_equal(a["ys"], b["ys"]) and a["slope"] == b["slope"]
    c = regression.simulate(jax.random.key(1), (XS,))
    assert a["slope"] != c["slope"]


def test_jit_vmap_grad_compose(key):
    jtr = jax.jit(regression.simulate)(key, (XS,))
    tr = regression.simulate(key, (XS,))
    assert_close(jtr.score, tr.score)

    keys = jax.random.split(key, 5)
    batch = jax.vmap(regression.simulate, in_axes=(0, None))(keys, (XS,))
    assert batch["slope"].shape == (5,) and batch["ys"].shape == (5, 7) and batch.score.shape == (5,)
    assert_close(batch.score[2], regression.simulate(keys[2], (XS,)).score)

    # grad of assess wrt continuous choices and args against jax.grad of the hand-written joint
    g_choices, g_xs = jax.grad(lambda c, xs: regression.assess(c, (xs,))[0], argnums=(0, 1))(tr.choices, XS)
    g_true = jax.grad(regression_log_joint, argnums=(0, 1, 2, 3))(tr["slope"], tr["noise"], tr["ys"], XS)
    for addr, g in zip(["slope", "noise", "ys"], g_true[:3]):
        assert_close(g_choices[addr], g, rtol=1e-4)
    assert_close(g_xs, g_true[3], rtol=1e-4)


def test_traces_pass_through_lax_scan(key):
    def body(carry, k):
        tr = regression.simulate(k, (XS,))
        return carry + tr.score, tr

    total, trs = jax.lax.scan(body, 0.0, jax.random.split(key, 4))
    assert trs["slope"].shape == (4,)
    assert_close(total, trs.score.sum(), rtol=1e-5)


def test_obs_site_is_always_constrained(key):
    ys = jnp.cos(XS)

    @ppl.gen
    def observed(xs, ys):
        slope = ppl.sample("slope", dist.Normal(0.0, 1.0))
        ppl.sample("ys", dist.Normal(slope * xs, 0.5), obs=ys)
        return slope

    tr = observed.simulate(key, (XS, ys))
    assert_close(tr["ys"], ys)
    lik = dist.Normal(tr["slope"] * XS, 0.5).log_prob(ys).sum()
    assert_close(tr.score, dist.Normal(0.0, 1.0).log_prob(tr["slope"]) + lik)
    _, w = observed.generate(key, {}, (XS, ys))
    assert_close(w, lik)  # generate weighs the obs site even without constraints
    with pytest.raises(ppl.AddressError, match="obs="):
        observed.generate(key, {"ys": ys}, (XS, ys))
    # update to new data through args: weight is the likelihood ratio
    ys2 = ys + 0.1
    tr2, w2, _ = observed.update(key, tr, {}, (XS, ys2))
    assert_close(w2, dist.Normal(tr["slope"] * XS, 0.5).log_prob(ys2).sum() - lik, rtol=1e-4)


def test_factor_and_reward(key):
    @ppl.gen
    def soft():
        x = ppl.sample("x", dist.Normal(0.0, 1.0))
        ppl.factor("penalty", -(x**2))
        r = ppl.reward("prm", jax.nn.sigmoid, x, beta=2.0)
        ppl.reward("odds", jax.nn.sigmoid, x, link="logit")
        return r

    tr = soft.simulate(key, ())
    x = tr["x"]
    expected_factors = -(x**2) + 2.0 * jnp.log(jax.nn.sigmoid(x)) + x  # logit(sigmoid(x)) = x
    assert_close(tr.score, dist.Normal(0.0, 1.0).log_prob(x) + expected_factors, rtol=1e-5)
    assert tr.choices.addresses() == [("x",)]  # factors record no choice
    assert_close(soft.assess({"x": x}, ())[0], tr.score)
    _, w = soft.generate(key, {"x": x}, ())
    assert_close(w, tr.score)
    assert_close(tr.retval, jax.nn.sigmoid(x))
    # boundary rewards: log link makes r = 0 impossible; logit link stays finite at r = 1
    edge = ppl.gen(lambda r: ppl.reward("r", lambda v: v, r, link="logit"))
    assert jnp.isfinite(edge.simulate(key, (1.0,)).score) and jnp.isfinite(edge.simulate(key, (0.0,)).score)
    zero = ppl.gen(lambda r: ppl.reward("r", lambda v: v, r))
    assert zero.simulate(key, (0.0,)).score == -jnp.inf
    with pytest.raises(ValueError, match="link"):
        ppl.gen(lambda: ppl.reward("r", jax.nn.sigmoid, 0.0, link="probit")).simulate(key, ())


def test_nested_and_inline_calls(key):
    @ppl.gen
    def inner(loc):
        return ppl.sample("z", dist.Normal(loc, 1.0))

    @ppl.gen
    def outer():
        mu = ppl.sample("mu", dist.Normal(0.0, 1.0))
        a = ppl.sample("sub", inner, mu)  # nested under 'sub'
        b = inner(a)  # inline: its 'z' lives in outer's namespace
        return b

    tr = outer.simulate(key, ())
    assert tr.choices.addresses() == [("mu",), ("sub", "z"), ("z",)]
    expected = (
        dist.Normal(0.0, 1.0).log_prob(tr["mu"])
        + dist.Normal(tr["mu"], 1.0).log_prob(tr["sub", "z"])
        + dist.Normal(tr["sub", "z"], 1.0).log_prob(tr["z"])
    )
    assert_close(tr.score, expected)
    # regenerate the parent: the nested site keeps its value, its density moves
    rtr, w = outer.regenerate(jax.random.key(3), tr, ppl.select("mu"))
    assert_close(rtr["sub", "z"], tr["sub", "z"])
    moved = dist.Normal(rtr["mu"], 1.0).log_prob(tr["sub", "z"]) - dist.Normal(tr["mu"], 1.0).log_prob(tr["sub", "z"])
    assert_close(w, moved, rtol=1e-4)
    # constraints and selections reach inside with tuple paths
    gtr, gw = outer.generate(key, {("sub", "z"): 0.5}, ())
    assert_close(gtr["sub", "z"], 0.5)
    assert_close(gw, dist.Normal(gtr["mu"], 1.0).log_prob(0.5))


def test_distribution_as_generative_function(key):
    normal = ppl.distribution(dist.Normal)
    tr = normal.simulate(key, (1.0, 2.0))
    assert_close(tr.score, dist.Normal(1.0, 2.0).log_prob(tr[()]))
    lp, v = normal.assess(ppl.ChoiceMap.leaf(0.5), (1.0, 2.0))
    assert_close(lp, dist.Normal(1.0, 2.0).log_prob(0.5))

    @ppl.gen
    def uses():
        return ppl.sample("x", normal, 0.0, 1.0)

    assert uses.simulate(key, ()).choices.addresses() == [("x",)]


def test_discrete_observations_are_cast_and_checked(key):
    @ppl.gen
    def counts():
        rate = ppl.sample("rate", dist.Gamma(2.0, 1.0))
        return ppl.sample("k", dist.Poisson(rate).expand((3,)))

    tr, w = counts.generate(key, {"k": jnp.array([1.0, 0.0, 4.0])}, ())
    assert tr["k"].dtype == jnp.int32
    assert_close(w, dist.Poisson(tr["rate"]).log_prob(jnp.array([1, 0, 4])).sum())
    with pytest.raises(ppl.ObservationError, match="non-integer"):
        counts.generate(key, {"k": jnp.array([1.5, 0.0, 4.0])}, ())
    with pytest.raises(ppl.ObservationError, match="outside the support"):
        counts.generate(key, {"k": jnp.array([-1, 0, 4])}, ())
    # a traced out-of-support value gets density -inf instead of a number
    lp = jax.jit(lambda k: counts.assess({"rate": 1.0, "k": k}, ())[0])(jnp.array([-1, 0, 4]))
    assert lp == -jnp.inf


@pytest.mark.parametrize(
    "d",
    [
        dist.Normal(0.3, 2.0),
        dist.Normal(jnp.array([0.0, 1.0, -1.0]), 0.5),
        dist.Normal(1.0, 0.7).expand((2, 3)),
        dist.Normal(jnp.zeros(3), jnp.ones(3)).to_event(1),
        dist.HalfNormal(1.5),
        dist.HalfNormal(jnp.array([0.5, 2.0])).expand((4, 2)).to_event(2),
    ],
)
def test_fast_density_paths_equal_numpyro(d, key):
    from ppl._distribution import log_density

    x = d.sample(key)
    assert_close(log_density(d, x, check_support=False), jnp.sum(d.log_prob(x)), rtol=1e-6)
    g_fast = jax.grad(lambda v: log_density(d, v, check_support=False))(x)
    g_ref = jax.grad(lambda v: jnp.sum(d.log_prob(v)))(x)
    assert_close(g_fast, g_ref, rtol=1e-5)
