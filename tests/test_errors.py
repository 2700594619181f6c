"""Every user mistake named in DESIGN.md is caught at trace time with the address and a fix."""

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
import pytest

import inference
import ppl
from models import regression


XS = jnp.linspace(-1.0, 1.0, 4)


def test_duplicate_address_names_both_lines(key):
    @ppl.gen
    def twice():
        ppl.sample("x", dist.Normal(0.0, 1.0))
        ppl.sample("x", dist.Normal(0.0, 1.0))

    with pytest.raises(ppl.DuplicateAddressError, match=r"'x' is used twice, at test_errors.py:\d+ and at test_errors.py:\d+"):
        twice.simulate(key, ())
    # also under jit: the check runs while tracing
    with pytest.raises(ppl.DuplicateAddressError):
        jax.jit(twice.simulate)(key, ())


def test_unknown_constraint_suggests_closest(key):
    with pytest.raises(ppl.UnknownAddressError, match=r"'slop' names no random choice.*Did you mean 'slope'\?"):
        regression.generate(key, {"slop": 1.0}, (XS,))
    with pytest.raises(ppl.UnknownAddressError, match="slop"):
        inference.importance(key, regression, (XS,), {"slop": 1.0}, 10)
    tr = regression.simulate(key, (XS,))
    with pytest.raises(ppl.UnknownAddressError, match="nois"):
        regression.update(key, tr, {"nois": 1.0}, (XS,))


def test_nested_unknown_constraint_reports_full_path(key):
    @ppl.gen
    def outer():
        return ppl.sample("fit", regression, XS)

    with pytest.raises(ppl.UnknownAddressError, match=r"\('fit', 'slop'\)"):
        outer.generate(key, {("fit", "slop"): 1.0}, ())


def test_observation_shape_mismatch(key):
    with pytest.raises(ppl.ObservationError, match=r"'ys' has shape \(3,\), but the site samples shape \(4,\)"):
        regression.generate(key, {"ys": jnp.zeros(3)}, (XS,))

    @ppl.gen
    def obs_model(y):
        ppl.sample("y", dist.Normal(0.0, 1.0), obs=y)

    with pytest.raises(ppl.ObservationError, match=r"expand"):
        obs_model.simulate(key, (jnp.zeros(5),))


def test_non_finite_observation(key):
    bad = jnp.array([0.0, jnp.nan, 1.0, 2.0])
    with pytest.raises(ppl.ObservationError, match=r"'ys' is not finite at index \(1,\)"):
        regression.generate(key, {"ys": bad}, (XS,))
    with pytest.raises(ppl.ObservationError, match="non-finite"):
        inference.importance(key, regression, (XS,), {"ys": bad}, 10)


def test_generative_function_without_its_args(key):
    @ppl.gen
    def outer():
        return ppl.sample("fit", regression)

    with pytest.raises(ppl.ArgumentError, match=r"ppl.sample\('fit', regression\).*ppl.sample\('fit', regression, \*args\)"):
        outer.simulate(key, ())
    with pytest.raises(ppl.ArgumentError, match=r"regression\(xs\) cannot take 0"):
        regression.simulate(key, ())
    with pytest.raises(ppl.ArgumentError, match="must be a tuple"):
        regression.simulate(key, XS)
    with pytest.raises(ppl.ArgumentError, match="not called directly|simulate"):
        regression(XS)


def test_bad_keys_and_sites(key):
    with pytest.raises(ppl.ArgumentError, match=r"jax.random.key\(0\)"):
        regression.simulate(0, (XS,))

    @ppl.gen
    def class_not_instance():
        ppl.sample("x", dist.Normal)

    with pytest.raises(ppl.ArgumentError, match="instance"):
        class_not_instance.simulate(key, ())

    @ppl.gen
    def bad_address():
        ppl.sample(3, dist.Normal(0.0, 1.0))

    with pytest.raises(ppl.AddressError, match="non-empty string"):
        bad_address.simulate(key, ())
    with pytest.raises(ppl.ArgumentError, match="outside a generative function"):
        ppl.sample("x", dist.Normal(0.0, 1.0))


def test_assess_needs_every_choice(key):
    with pytest.raises(ppl.UnknownAddressError, match="no value for random choice 'noise'"):
        regression.assess({"slope": 0.0, "ys": jnp.zeros(4)}, (XS,))


def test_all_weights_minus_infinity_names_the_site(key):
    @ppl.gen
    def positive():
        rate = ppl.sample("rate", dist.Gamma(2.0, 2.0))
        return ppl.sample("wait", dist.Exponential(rate))

    # traced inside importance's jit, so the support test happens at run time
    with pytest.raises(ppl.InferenceError, match=r"all 16 log weights are -inf.*'wait'"):
        inference.importance(key, positive, (), {"wait": -1.0}, 16)


def test_a_value_where_a_nested_model_is_expected(key):
    @ppl.gen
    def outer():
        return ppl.sample("fit", regression, XS)

    with pytest.raises(ppl.AddressError, match=r"single value at 'fit'.*\('fit', 'slope'\): value"):
        outer.generate(key, {"fit": 1.0}, ())
