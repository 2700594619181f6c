"""The public site-handler seam, and the unconstrained density built on it outside `ppl/`.

Truths: numpyro's own `potential_energy` (its transforms and Jacobians, a separate code
path) for the unconstrained log density; change of variables by hand for a
one-dimensional case; exact tempered scores from numpyro log densities.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from conftest import assert_close, tree_allclose
from numpyro.infer.util import potential_energy

import inference
import ppl


@ppl.gen
def simplex_part(a):
    return ppl.sample("w", dist.Dirichlet(jnp.ones(3) * a))


@ppl.gen
def step(c, _):
    z = ppl.sample("z", dist.LogNormal(c, 0.5))
    return jnp.log(z), z


@ppl.gen
def constrained(y):
    mu = ppl.sample("mu", dist.Normal(0.0, 1.0))
    s = ppl.sample("s", dist.HalfNormal(1.0))
    p = ppl.sample("p", dist.Beta(2.0, 3.0))
    u = ppl.sample("u", dist.Uniform(0.0, s + 1.0))  # support depends on another latent
    ppl.sample("sub", simplex_part, 2.0)
    ppl.sample("chain", ppl.scan(step, length=2), 0.0, None)
    ppl.deterministic("d", mu * p)
    ppl.sample("y", dist.Normal(mu, s).expand((2,)), obs=y)
    return u


def numpyro_constrained(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    s = numpyro.sample("s", dist.HalfNormal(1.0))
    numpyro.sample("p", dist.Beta(2.0, 3.0))
    numpyro.sample("u", dist.Uniform(0.0, s + 1.0))
    numpyro.sample("w", dist.Dirichlet(jnp.ones(3) * 2.0))
    c = 0.0
    for t in range(2):
        c = jnp.log(numpyro.sample(f"z{t}", dist.LogNormal(c, 0.5)))
    numpyro.sample("y", dist.Normal(mu, s).expand((2,)), obs=y)


Y = jnp.array([0.3, -0.2])


def test_unconstrained_density_equals_numpyro_potential(key):
    for k in jax.random.split(key, 3):
        tr = constrained.simulate(k, (Y,))
        u = inference.to_unconstrained(constrained, (Y,), tr.choices)
        assert u["sub", "w"].shape == (2,)  # the 3-simplex maps to 2 reals
        flat = {"mu": u["mu"], "s": u["s"], "p": u["p"], "u": u["u"], "w": u["sub", "w"],
                "z0": u["chain", "z"][0], "z1": u["chain", "z"][1]}
        lp, _ = inference.unconstrained(constrained).assess(u, (Y,))
        assert_close(lp, -potential_energy(numpyro_constrained, (Y,), {}, flat), rtol=1e-5, atol=1e-4)
        # and back: the constrained trace, deterministic and score included
        back = inference.to_constrained(constrained, (Y,), u)
        tree_allclose(back.choices, tr.choices, rtol=1e-4, atol=1e-5)
        assert_close(back["d"], tr["d"], rtol=1e-4)
        assert_close(back.score, tr.score, rtol=1e-4, atol=1e-4)


def test_unconstrained_density_by_change_of_variables():
    @ppl.gen
    def scale():
        return ppl.sample("s", dist.Exponential(2.0))

    # s = exp(u): log p(u) = log 2 - 2 exp(u) + u
    for u in (-1.0, 0.0, 0.7):
        lp, s = inference.unconstrained(scale).assess({"s": u}, ())
        assert_close(lp, np.log(2.0) - 2.0 * np.exp(u) + u)
        assert_close(s, np.exp(u))  # the body received the constrained value
    g = jax.grad(lambda u: inference.unconstrained(scale).assess({"s": u}, ())[0])(0.7)
    assert_close(g, -2.0 * np.exp(0.7) + 1.0)


@pytest.mark.slow  # heavy for the 15-minute CI budget: pytest -m slow runs it
def test_unconstrained_model_composes_with_jit_vmap_and_grad(key):
    model = inference.unconstrained(constrained)
    traces = jax.vmap(model.simulate, in_axes=(0, None))(jax.random.split(key, 4), (Y,))
    lps = jax.jit(jax.vmap(lambda c: model.assess(c, (Y,))[0]))(traces.choices)
    assert_close(lps, traces.score, rtol=1e-5, atol=1e-4)
    grads = jax.grad(lambda c: model.assess(c, (Y,))[0])(jax.tree.map(lambda x: x[0], traces.choices))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_a_discrete_site_is_refused_by_name(key):
    @ppl.gen
    def mixed():
        ppl.sample("k", dist.Poisson(3.0))
        return ppl.sample("x", dist.Normal(0.0, 1.0))

    with pytest.raises(ppl.ArgumentError, match=r"\('k',\) is discrete.*Gibbs"):
        inference.unconstrained(mixed).simulate(key, ())


class Temper(ppl.SiteHandler):
    def __init__(self, beta):
        self.beta = beta

    def process(self, site):
        if site.kind in ("observed", "factor", "reward"):
            return site._replace(scale=site.scale * self.beta)
        return site


def test_tempering_handler_scales_evidence_in_every_method(key):
    @ppl.gen
    def model():
        mu = ppl.sample("mu", dist.Normal(0.0, 1.0))
        ppl.sample("y", dist.Normal(mu, 1.0), obs=1.0)
        ppl.factor("f", -mu**2)
        ppl.reward("r", jax.nn.sigmoid, mu)
        return mu

    tempered = ppl.handle(model, Temper(0.25))

    def exact(mu, beta):
        evidence = dist.Normal(mu, 1.0).log_prob(1.0) - mu**2 + jnp.log(jax.nn.sigmoid(mu))
        return dist.Normal(0.0, 1.0).log_prob(mu) + beta * evidence

    tr = tempered.simulate(key, ())
    assert_close(tr.score, exact(tr["mu"], 0.25))
    assert_close(tempered.assess(tr.choices, ())[0], exact(tr["mu"], 0.25))
    _, w = tempered.generate(key, {}, ())
    _, w_jit = jax.jit(tempered.generate)(key, {}, ())
    assert_close(w, w_jit)
    new, w, _ = tempered.update(key, tr, {"mu": 0.4}, ())
    assert_close(w, exact(0.4, 0.25) - tr.score)
    # nesting: handle(handle(m, a), b) applies both handlers (same key, same mu)
    twice = ppl.handle(model, Temper(0.5), Temper(0.5))
    assert_close(twice.simulate(key, ()).score, exact(tr["mu"], 0.25))


class Record(ppl.SiteHandler):
    def __init__(self):
        self.seen = []

    def process(self, site):
        self.seen.append((site.kind, site.path, site.method))
        return site


def test_handlers_see_every_site_with_paths_relative_to_the_handled_function(key):
    @ppl.gen
    def outer():
        ppl.sample("a", ppl.distribution(dist.Normal), 0.0, 1.0)
        return ppl.sample("m", constrained, Y)

    rec = Record()
    ppl.handle(outer, rec).simulate(key, ())
    kinds = {(k, p) for k, p, _ in rec.seen}
    assert ("latent", ("a",)) in kinds  # a ppl.distribution call is a latent site too
    assert ("latent", ("m", "sub", "w")) in kinds
    assert ("latent", ("m", "chain", "z")) in kinds  # inside the scan, per step
    assert ("observed", ("m", "y")) in kinds and ("deterministic", ("m", "d")) in kinds
    assert {m for _, _, m in rec.seen} == {"simulate"}


def test_handle_refuses_what_is_not_a_handler():
    with pytest.raises(ppl.ArgumentError, match="SiteHandler"):
        ppl.handle(constrained, object())

    class Broken(ppl.SiteHandler):
        def process(self, site):
            return None

    with pytest.raises(ppl.ArgumentError, match="must return a ppl.Site"):
        ppl.handle(constrained, Broken()).simulate(jax.random.key(0), (Y,))
