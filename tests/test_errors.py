"""Every user mistake the core can detect is caught at trace time with the address and a fix."""

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

    # a support that does not depend on parameters is checked on the host, before the run
    with pytest.raises(ppl.ObservationError, match=r"'wait' lies outside the support"):
        inference.importance(key, positive, (), {"wait": -1.0}, 16)

    @ppl.gen
    def shifted():
        rate = ppl.sample("rate", dist.Gamma(2.0, 2.0))
        return ppl.sample("wait", dist.Uniform(rate + 1.0, rate + 2.0))

    # a support that moves with a latent is tested at run time, inside importance's jit
    with pytest.raises(ppl.InferenceError, match=r"all 16 log weights are -inf.*'wait'"):
        inference.importance(key, shifted, (), {"wait": 0.5}, 16)


def test_a_value_where_a_nested_model_is_expected(key):
    @ppl.gen
    def outer():
        return ppl.sample("fit", regression, XS)

    with pytest.raises(ppl.AddressError, match=r"single value at 'fit'.*\('fit', 'slope'\): value"):
        outer.generate(key, {"fit": 1.0}, ())


@ppl.gen
def branches_in_python():
    x = ppl.sample("x", dist.Normal(0.0, 1.0))
    if x > 0:  # the mistake: Python control flow on a random value
        return ppl.sample("pos", dist.Normal(1.0, 1.0))
    return ppl.sample("neg", dist.Normal(-1.0, 1.0))


def test_random_value_in_python_control_flow_names_the_line(key):
    message = r"branches_in_python: a traced value decides Python control flow at test_errors.py:\d+ \(`if x > 0:.*ppl.switch.*jnp.where"
    with pytest.raises(ppl.ControlFlowError, match=message):
        branches_in_python.simulate(key, ())  # eager: caught by the first call's abstract trace
    with pytest.raises(ppl.ControlFlowError, match=message):
        jax.jit(branches_in_python.simulate)(key, ())
    with pytest.raises(ppl.ControlFlowError, match=message):
        branches_in_python.generate(key, {"pos": 1.0}, ())  # not "names no random choice"
    with pytest.raises(ppl.ControlFlowError, match=message):
        inference.importance(key, branches_in_python, (), {}, 10)


def test_suggestions_are_full_paths(key):
    @ppl.gen
    def school(sigma):
        theta = ppl.sample("theta", dist.Normal(0.0, 5.0))
        return ppl.sample("y", dist.Normal(theta, sigma))

    @ppl.gen
    def schools(sigmas):
        ppl.sample("mu", dist.Normal(0.0, 5.0))
        return ppl.sample("schools", ppl.vmap(school, in_axes=(0,)), sigmas)

    sigmas = jnp.ones(3)
    with pytest.raises(ppl.UnknownAddressError, match=r"'y' names no random choice.*Did you mean \('schools', 'y'\)\?"):
        schools.generate(key, {"y": jnp.zeros(3)}, (sigmas,))
    # a typo inside the nested model: both the given path and the suggestion are full paths
    with pytest.raises(ppl.UnknownAddressError, match=r"\('schools', 'thetaa'\) names no random choice.*Did you mean \('schools', 'theta'\)\?"):
        schools.generate(key, {("schools", "thetaa"): jnp.zeros(3)}, (sigmas,))


def test_inference_errors_name_the_entry_point_and_args_must_be_a_tuple(key):
    with pytest.raises(ppl.ArgumentError, match=r"^inference.importance: `args` must be a tuple.*tuple\(args\)"):
        inference.importance(key, regression, [XS], {}, 10)
    with pytest.raises(ppl.ArgumentError, match=r"^inference.importance: the first argument must be a jax.random key"):
        inference.importance(0, regression, (XS,), {}, 10)
    with pytest.raises(ppl.ArgumentError, match=r"regression.simulate: `args` must be a tuple"):
        regression.simulate(key, [XS])


def test_a_single_scan_step_cannot_be_addressed_and_the_message_says_how(key):
    @ppl.gen
    def step(z, _):
        z = ppl.sample("z", dist.Normal(z, 1.0))
        return z, z

    chain = ppl.scan(step, length=4)
    with pytest.raises(ppl.AddressError, match=r"addresses are strings only.*time .*axis first.*mask"):
        chain.generate(key, {("z", 3): 1.0}, (0.0, None))
    with pytest.raises(ppl.ObservationError, match=r"needs the time axis first, of size 4"):
        chain.generate(key, {"z": 1.0}, (0.0, None))
