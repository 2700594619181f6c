"""The GFI laws on randomly generated small models (hypothesis, derandomized), checked
against an independent reference implementation (`reference_gfi.py`).

Models are built from a few distribution families (real, positive, unit-interval, count
and binary valued, scalar or batched), each site's parameter driven by an earlier site,
the model's argument or a constant; outer sites may be observed with `obs=`; plus a
factor and a reward (`ppl.reward`), wrapped in one nesting pattern: flat, a nested call,
`ppl.vmap`, `ppl.scan`, `ppl.switch` or `ppl.mask` (switched on or off). The laws are identities, checked to float32 rounding:

  score == assess(simulate().choices) == the reference log joint
  simulate / generate / update / regenerate traces share one pytree structure
  generate(some choices) weight == the reference density of those choices + factors,
      and the constrained choices come back unchanged (all choices: weight == score)
  update(trace, all choices of another trace) weight == reference new - old log joint
  update(trace, some choices) weight == reference new - old log joint (no fresh draws)
  regenerate(trace, sel): unselected choices untouched, weight == the change of every
      unselected reference term (factors included)
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import ppl

import reference_gfi as ref

FAMILIES = ("normal", "gamma", "beta", "poisson", "bernoulli")
NESTINGS = ("flat", "call", "vmap", "scan", "switch", "mask")
# A value in the support of each family, for sites observed with obs=.
OBSERVED = {"normal": 0.3, "gamma": 1.2, "beta": 0.4, "poisson": 2, "bernoulli": 1}
# CI draws 4 models per law (the suite must stay under 15 minutes on 2 cores);
# PPL_LAW_EXAMPLES=500 gives a thorough local run.
LAWS = settings(max_examples=int(os.environ.get("PPL_LAW_EXAMPLES", 4)), deadline=None, derandomize=True,
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


def _parameter(parent, i, s0, values):
    if parent == "const":
        return 0.7
    if parent is None or parent >= i:
        return s0
    return jnp.mean(jnp.asarray(values[parent], float))


def _sites_fn(sites, lang):
    """Body that samples `sites` [(family, parent, shape, observed)]: parent is the index
    of an earlier site, None (the argument) or "const"; observed sites use obs=."""

    def body(s0):
        values = []
        for i, (family, parent, shape, observed) in enumerate(sites):
            d = _distribution(family, _parameter(parent, i, s0, values), shape)
            obs = jnp.full(shape, OBSERVED[family]) if observed else None
            values.append(lang.sample(f"s{i}", d, obs=obs))
        return jnp.mean(jnp.asarray(values[-1], float))

    return body


def _site(observable):
    return st.tuples(
        st.sampled_from(FAMILIES),
        st.one_of(st.none(), st.just("const"), st.integers(0, 3)),
        st.sampled_from([(), (2,)]),
        st.booleans() if observable else st.just(False),
    )


def observed_addresses(spec):
    """Top-level addresses of the evidence terms: obs= sites, the factor, the reward."""
    outer, _, _, with_factor, with_reward, _ = spec
    names = [f"s{i}" for i, site in enumerate(outer) if site[3]]
    return names + (["f"] if with_factor else []) + (["r"] if with_reward else [])


def build(spec, lang):
    """The model of `spec` written in `lang` (the `ppl` module or the reference)."""
    outer, inner, nesting, with_factor, with_reward, is_active = spec
    outer_body, inner_body = _sites_fn(outer, lang), _sites_fn(inner, lang)

    @lang.gen
    def inner_gf(s):
        return inner_body(s)

    @lang.gen
    def kernel(carry, x):
        v = inner_body(carry + x)
        return v, v

    @lang.gen
    def other_branch(s):
        return lang.sample("t", dist.Normal(s, 2.0))

    @lang.gen
    def model(scale):
        s = outer_body(scale)
        if nesting == "call":
            s = lang.sample("sub", inner_gf, s)
        elif nesting == "vmap":
            s = jnp.mean(lang.sample("many", lang.vmap(inner_gf), s * jnp.arange(3.0)))
        elif nesting == "scan":
            s, _ = lang.sample("steps", lang.scan(kernel), s, jnp.arange(3.0))
        elif nesting == "switch":
            k = lang.sample("k", dist.Bernoulli(0.5))
            s = lang.sample("branch", lang.switch(inner_gf, other_branch), k, s)
        elif nesting == "mask":
            s = lang.sample("masked", lang.mask(inner_gf), is_active, s)
        if with_factor:
            lang.factor("f", -0.1 * s**2)
        if with_reward:
            lang.reward("r", jax.nn.sigmoid, s, beta=0.5)
        return s

    return model


@st.composite
def models(draw):
    spec = (
        draw(st.lists(_site(observable=True), min_size=1, max_size=3)),
        draw(st.lists(_site(observable=False), min_size=1, max_size=3)),
        draw(st.sampled_from(NESTINGS)),
        draw(st.booleans()),
        draw(st.booleans()),
        draw(st.booleans()),
    )
    return model_of(spec)


def model_of(spec):
    """The `ppl` model of `spec`, with its reference twin and the spec attached."""
    model = build(spec, ppl)
    model.reference = build(spec, ref)
    model.spec = spec  # shown by hypothesis on failure
    return model


# Always-run examples, so that every site kind and both mask states are in each CI run
# whatever the random draw: (outer sites, inner sites, nesting, factor, reward, is_active).
_OBSERVED_GAMMA = ("gamma", "const", (2,), True)
EXAMPLES = [
    model_of(([("normal", None, (), False), _OBSERVED_GAMMA], [("beta", None, (), False)], "mask", True, True, False)),
    model_of(([("poisson", "const", (), False)], [("normal", 0, (2,), False)], "mask", False, True, True)),
    model_of(([("normal", None, (), False), ("bernoulli", 0, (), True)], [("gamma", None, (), False)], "switch", True, False, True)),
]


def with_examples(test):
    for model in EXAMPLES:
        test = example(model, 3)(test)
    return test


def reference(model, trace_or_choices, args=None):
    """(log joint, per-address terms) of the reference implementation."""
    choices = getattr(trace_or_choices, "choices", trace_or_choices)
    args = trace_or_choices.args if args is None else args
    total, terms, _ = model.reference.assess(choices, args)
    return total, terms


def subset(data, items, **kw):
    """A drawn subset of `items` (empty when there is nothing to draw from)."""
    items = list(items)
    return data.draw(st.lists(st.sampled_from(items), unique=True, **kw)) if items else []


def with_branch(chosen):
    """A switch's index and its branch are constrained or selected together."""
    chosen = list(chosen)
    if ("k" in chosen) != ("branch" in chosen):
        chosen = [c for c in chosen if c not in ("k", "branch")] + ["k", "branch"]
    return chosen


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
@with_examples
def test_score_and_assess_match_the_reference(model, seed):
    tr = model.simulate(jax.random.key(seed), ARGS)
    truth, _ = reference(model, tr)
    close(tr.score, truth)
    lp, retval = model.assess(tr.choices, ARGS)
    close(lp, truth)
    close(retval, tr.retval)
    close(model.project(tr, ppl.Selection.all()), tr.score)


@LAWS
@given(models(), st.integers(0, 2**16), st.data())
def test_generate_weight_is_the_constrained_density(model, seed, data):
    tr = model.simulate(jax.random.key(seed), ARGS)
    chosen = with_branch(subset(data, tr.choices))
    constraints = ppl.ChoiceMap({a: tr.choices[a] for a in chosen})
    gtr, w = model.generate(jax.random.key(seed + 1), constraints, ARGS)
    _, terms = reference(model, gtr)  # densities at the generated trace's values
    close(w, sum(terms[a] for a in chosen) + sum(terms[a] for a in observed_addresses(model.spec)))
    for a in chosen:
        same_choices(gtr.choices.get_submap(a), tr.choices.get_submap(a))
    same_structure(gtr, tr)
    if len(chosen) == len(tr.choices):  # fully constrained: the weight is the score
        close(w, tr.score)


@LAWS
@given(models(), st.integers(0, 2**16))
@with_examples
def test_update_to_another_trace_weight_is_the_score_ratio(model, seed):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    old, new = model.simulate(k1, ARGS), model.simulate(k2, ARGS)
    utr, w, _ = model.update(k3, old, new.choices, (0.7,))
    same_structure(utr, old)
    new_truth, _ = reference(model, new.choices, (0.7,))
    close(utr.score, new_truth)
    close(w, new_truth - reference(model, old)[0])


@LAWS
@given(models(), st.integers(0, 2**16), st.data())
def test_partial_update_weight_is_the_score_ratio(model, seed, data):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    old, other = model.simulate(k1, ARGS), model.simulate(k2, ARGS)
    top = [a for a in old.choices if a not in ("k", "branch")]  # a branch flip draws afresh
    chosen = subset(data, top)
    constraints = ppl.ChoiceMap({a: other.choices[a] for a in chosen})
    utr, w, discard = model.update(k3, old, constraints, ARGS)
    close(w, reference(model, utr)[0] - reference(model, old)[0])
    close(utr.score, reference(model, utr)[0])
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
    chosen = with_branch(subset(data, top))
    new, w = model.regenerate(k2, old, ppl.select(*chosen))
    same_structure(new, old)
    for a in top:
        if a not in chosen:
            same_choices(new.choices.get_submap(a), old.choices.get_submap(a))
    # MH ratio of a prior move: the change in every unselected term, factors included
    (_, new_terms), (_, old_terms) = reference(model, new), reference(model, old)
    close(w, sum(new_terms[a] - old_terms[a] for a in new_terms if a not in chosen))
    close(new.score, sum(new_terms.values()))
    none = ppl.Selection.none()
    close(model.project(new, none), sum(new_terms[a] for a in observed_addresses(model.spec)))


@pytest.mark.slow  # heavy for the 15-minute CI budget: pytest -m slow runs it
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
