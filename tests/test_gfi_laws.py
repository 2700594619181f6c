"""The GFI laws on randomly generated small models (hypothesis, derandomized).

Models are built from a few distribution families (real, positive, unit-interval, count
and binary valued, scalar or batched), each site's parameter driven by an earlier site,
plus a factor, wrapped in one nesting pattern: flat, a nested call, `ppl.vmap`,
`ppl.scan` or `ppl.switch`. The laws are identities, checked to float32 rounding:

  assess(simulate().choices) == score
  simulate / generate / update / regenerate traces share one pytree structure
  generate(all choices) weight == score, and the choices come back unchanged
  update(trace, all choices of another trace) weight == new score - old score
  update(trace, some choices) weight == new score - old score (no fresh draws)
  regenerate(trace, sel): unselected choices untouched, weight == change of the score
      without the selected choices' densities, project(all) == score
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ppl

FAMILIES = ("normal", "gamma", "beta", "poisson", "bernoulli")
NESTINGS = ("flat", "call", "vmap", "scan", "switch")
# CI draws 10 models per law; PPL_LAW_EXAMPLES=500 gives a thorough local run.
LAWS = settings(max_examples=int(os.environ.get("PPL_LAW_EXAMPLES", 10)), deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
RTOL, ATOL = 2e-5, 2e-4  # float32 sums of a handful of log densities


def _distribution(family, s, shape):
    """A distribution of `family` whose parameter is driven by the scalar `s`."""
    soft = jax.nn.softplus(s)
    d = {
        "normal": lambda: dist.Normal(s, 1.0),
        "gamma": lambda: dist.Gamma(2.0, 1.0 + soft),
        "beta": lambda: dist.Beta(1.0 + soft, 2.0),
        "poisson": lambda: dist.Poisson(0.5 + soft),
        "bernoulli": lambda: dist.Bernoulli(probs=jax.nn.sigmoid(s)),
    }[family]()
    return d.expand(shape) if shape else d


def _sites_fn(sites, prefix=""):
    """Body that samples `sites` [(family, parent, shape)], parent = index of an earlier site."""

    def body(s0):
        values = []
        for i, (family, parent, shape) in enumerate(sites):
            s = s0 if parent is None or parent >= i else jnp.mean(jnp.asarray(values[parent], float))
            values.append(ppl.sample(f"{prefix}s{i}", _distribution(family, s, shape)))
        return jnp.mean(jnp.asarray(values[-1], float))

    return body


site = st.tuples(
    st.sampled_from(FAMILIES),
    st.one_of(st.none(), st.integers(0, 3)),
    st.sampled_from([(), (2,)]),
)


@st.composite
def models(draw):
    outer = draw(st.lists(site, min_size=1, max_size=3))
    inner = draw(st.lists(site, min_size=1, max_size=3))
    nesting = draw(st.sampled_from(NESTINGS))
    with_factor = draw(st.booleans())
    outer_body, inner_body = _sites_fn(outer), _sites_fn(inner)

    @ppl.gen
    def inner_gf(s):
        return inner_body(s)

    @ppl.gen
    def kernel(carry, x):
        v = inner_body(carry + x)
        return v, v

    @ppl.gen
    def other_branch(s):
        return ppl.sample("t", dist.Normal(s, 2.0))

    @ppl.gen
    def model(scale):
        s = outer_body(scale)
        if nesting == "call":
            s = ppl.sample("sub", inner_gf, s)
        elif nesting == "vmap":
            s = jnp.mean(ppl.sample("many", ppl.vmap(inner_gf), s * jnp.arange(3.0)))
        elif nesting == "scan":
            s, _ = ppl.sample("steps", ppl.scan(kernel), s, jnp.arange(3.0))
        elif nesting == "switch":
            k = ppl.sample("k", dist.Bernoulli(0.5))
            s = ppl.sample("branch", ppl.switch(inner_gf, other_branch), k, s)
        if with_factor:
            ppl.factor("f", -0.1 * s**2)
        return s

    model.spec = (outer, inner, nesting, with_factor)  # shown by hypothesis on failure
    return model


ARGS = (0.3,)


def close(a, b):
    np.testing.assert_allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), rtol=RTOL, atol=ATOL)


def same_structure(a, b):
    """Traces that lax.cond / lax.scan can mix: same treedef, leaf shapes and dtypes."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert (jnp.shape(x), jnp.result_type(x)) == (jnp.shape(y), jnp.result_type(y))


def same_choices(a, b):
    assert a.addresses() == b.addresses()
    for address in a.addresses():
        close(a[address], b[address])


@LAWS
@given(models(), st.integers(0, 2**16))
def test_assess_of_simulated_choices_is_the_score(model, seed):
    tr = model.simulate(jax.random.key(seed), ARGS)
    lp, retval = model.assess(tr.choices, ARGS)
    close(lp, tr.score)
    close(retval, tr.retval)
    close(model.project(tr, ppl.Selection.all()), tr.score)


@LAWS
@given(models(), st.integers(0, 2**16))
def test_fully_constrained_generate_weight_is_the_score(model, seed):
    tr = model.simulate(jax.random.key(seed), ARGS)
    gtr, w = model.generate(jax.random.key(seed + 1), tr.choices, ARGS)
    close(w, tr.score)
    close(gtr.score, tr.score)
    same_choices(gtr.choices, tr.choices)
    same_structure(gtr, tr)


@LAWS
@given(models(), st.integers(0, 2**16))
def test_update_to_another_trace_weight_is_the_score_ratio(model, seed):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    old, new = model.simulate(k1, ARGS), model.simulate(k2, ARGS)
    utr, w, _ = model.update(k3, old, new.choices, (0.7,))
    same_structure(utr, old)
    new_score, _ = model.assess(new.choices, (0.7,))
    close(utr.score, new_score)
    close(w, new_score - old.score)


@LAWS
@given(models(), st.integers(0, 2**16), st.data())
def test_partial_update_weight_is_the_score_ratio(model, seed, data):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    old, other = model.simulate(k1, ARGS), model.simulate(k2, ARGS)
    top = [a for a in old.choices if a not in ("k", "branch")]  # a branch flip draws afresh
    chosen = data.draw(st.lists(st.sampled_from(top), unique=True, max_size=len(top)))
    constraints = ppl.ChoiceMap({a: other.choices[a] for a in chosen})
    utr, w, discard = model.update(k3, old, constraints, ARGS)
    close(w, utr.score - old.score)
    close(model.assess(utr.choices, ARGS)[0], utr.score)
    for a in old.choices:
        if a not in chosen:
            same_choices(utr.choices.get_submap(a), old.choices.get_submap(a))
    assert sorted(discard) == sorted(chosen)


@LAWS
@given(models(), st.integers(0, 2**16), st.data())
def test_regenerate_keeps_unselected_choices_and_weighs_them(model, seed, data):
    k1, k2 = jax.random.split(jax.random.key(seed))
    old = model.simulate(k1, ARGS)
    top = list(old.choices)
    chosen = data.draw(st.lists(st.sampled_from(top), unique=True, max_size=len(top)))
    if "k" in chosen and "branch" not in chosen:
        chosen.append("branch")  # a branch flip redraws the branch's choices
    sel = ppl.select(*chosen)
    new, w = model.regenerate(k2, old, sel)
    same_structure(new, old)
    for a in top:
        if a not in chosen:
            same_choices(new.choices.get_submap(a), old.choices.get_submap(a))
    none = ppl.Selection.none()

    def unselected(tr):  # score minus the selected choices' densities; factors stay in
        return tr.score - (model.project(tr, sel) - model.project(tr, none))

    close(w, unselected(new) - unselected(old))
    close(model.assess(new.choices, ARGS)[0], new.score)


@LAWS
@given(models(), st.integers(0, 2**16))
def test_jit_and_vmap_agree_with_eager(model, seed):
    key = jax.random.key(seed)
    eager = model.simulate(key, ARGS)
    jitted = jax.jit(model.simulate)(key, ARGS)
    same_choices(jitted.choices, eager.choices)
    close(jitted.score, eager.score)
    keys = jax.random.split(key, 3)
    batch = jax.vmap(model.simulate, in_axes=(0, None))(keys, ARGS)
    one = model.simulate(keys[1], ARGS)
    close(batch.score[1], one.score)
    same_choices(jax.tree.map(lambda x: x[1], batch).choices, one.choices)
