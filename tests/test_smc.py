"""smc: particle filter against the exact Kalman filter, resampler laws, error messages."""

import doctest
import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import inference
import ppl
import smc
from smc import _filter, _resampling

from models import A, Q, R, kalman, lgss_step  # noqa: F401  (A, Q, R: the model's constants)

T = 30
MODEL = ppl.scan(lgss_step, length=T)
ARGS = (0.0, None)
YS = MODEL.simulate(jax.random.key(42), ARGS)["y"]


_K = kalman(YS)
EXACT, FILTER_MEANS, FILTER_VARS = _K["log_lik"], _K["filter_means"], _K["filter_vars"]


def run_seeds(num_seeds, num_particles, first_seed=0, **kwargs):
    """(log_marginal [S], final filtering mean [S]) over S keys, one vmapped jit."""
    def one(key):
        res = smc.particle_filter(key, MODEL, ARGS, {"y": YS}, num_particles, **kwargs)
        mean = jnp.sum(res.normalized_weights() * res.particles["x"])
        return res.log_marginal, mean

    keys = jax.random.split(jax.random.key(first_seed), num_seeds)
    lz, mean = jax.jit(jax.vmap(one))(keys)
    return np.asarray(lz, np.float64), np.asarray(mean, np.float64)


@pytest.fixture(scope="module")
def bootstrap_runs():
    return run_seeds(20, 1000)


def test_log_marginal_matches_kalman(bootstrap_runs):
    lz, _ = bootstrap_runs
    sd = lz.std(ddof=1)
    # log Z-hat is biased low: with Z-hat / Z = 1 + e, E[e] = 0 (the PF estimate of Z is
    # unbiased), log(1 + e) ~ e - e^2/2, so E[log Z-hat] ~ log Z - Var(log Z-hat) / 2. Allow
    # that bias on top of 5 standard errors of the mean (false alarm ~ 1e-6 for a normal mean).
    assert abs(lz.mean() - EXACT) < 5 * sd / math.sqrt(len(lz)) + sd**2 / 2 + 1e-3 * abs(EXACT)
    assert sd < 1.0  # N = 1000 on 30 steps: the estimator is informative


def test_filtering_mean_matches_kalman(bootstrap_runs):
    _, mean = bootstrap_runs
    # Each seed's weighted mean has s.d. about sqrt(P_T / ESS); over 20 seeds the average is
    # within 5 standard errors (its bias is O(1/N), negligible at N = 1000).
    se = mean.std(ddof=1) / math.sqrt(len(mean))
    assert abs(mean.mean() - FILTER_MEANS[-1]) < 5 * se + 0.01
    assert np.all(np.abs(mean - FILTER_MEANS[-1]) < 5 * math.sqrt(FILTER_VARS[-1] / 100))


def test_evidence_estimate_is_unbiased():
    # E[Z-hat / Z] = 1 exactly for any N; the mean ratio over S seeds has s.e. sd(ratio)/sqrt(S).
    lz, _ = run_seeds(400, 100, first_seed=1)
    ratio = np.exp(lz - EXACT)
    se = ratio.std(ddof=1) / math.sqrt(len(ratio))
    assert abs(ratio.mean() - 1.0) < 5 * se


def test_locally_optimal_proposal():
    # p(x_t | x_{t-1}, y_t) is Normal(v (A x / Q^2 + y / R^2), v), 1/v = 1/Q^2 + 1/R^2; with it
    # the increment is p(y_t | x_{t-1}), free of x_t, so log Z is much tighter than bootstrap.
    v = 1.0 / (1.0 / Q**2 + 1.0 / R**2)

    @ppl.gen
    def optimal(x_prev, _, obs):
        return ppl.sample("x", dist.Normal(v * (A * x_prev / Q**2 + obs["y"] / R**2), math.sqrt(v)))

    lz, mean = run_seeds(20, 200, first_seed=2, proposal=optimal)
    boot, _ = run_seeds(20, 200, first_seed=2)
    sd = lz.std(ddof=1)
    assert abs(lz.mean() - EXACT) < 5 * sd / math.sqrt(len(lz)) + sd**2 / 2 + 1e-4 * abs(EXACT)
    assert sd < 0.5 * boot.std(ddof=1)
    assert abs(mean.mean() - FILTER_MEANS[-1]) < 5 * mean.std(ddof=1) / math.sqrt(len(mean)) + 0.01


# -- rejuvenation ------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", [inference.mh("x"), inference.hmc(step_size=0.3, num_steps=5)],
                         ids=["mh", "hmc"])
def test_rejuvenation_leaves_filtering_distribution_invariant(kernel):
    # The kernel moves x_t given x_{t-1} and y_t after each resampling, targeting
    # p(x_t | x_{t-1}, y_t): the evidence and the filtering means must still be Kalman's.
    # Tolerances as in the bootstrap tests: 5 standard errors of the mean over 20 seeds
    # (from the spread of the seeds' values) plus the -Var/2 bias of log Z-hat; a kernel
    # that ignored y_t (the prior's conditional) or moved weighted particles is off by far more.
    num_seeds, n = 20, 200

    def one(key):
        res = smc.particle_filter(key, MODEL, ARGS, {"y": YS}, n, rejuvenation=kernel)
        steps = res.paths()  # every step's filtering mean, from the stored (moved) traces
        step_x = res._steps.choices["x"]  # [T, N]
        return res.log_marginal, jnp.sum(jnp.exp(res.step_log_weights) * step_x, axis=1), steps["x"]

    keys = jax.random.split(jax.random.key(11), num_seeds)
    lz, means, paths_x = jax.jit(jax.vmap(one))(keys)
    lz, means = np.asarray(lz, np.float64), np.asarray(means, np.float64)
    sd = lz.std(ddof=1)
    assert abs(lz.mean() - EXACT) < 5 * sd / math.sqrt(num_seeds) + sd**2 / 2 + 1e-3 * abs(EXACT)
    se = means.std(axis=0, ddof=1) / math.sqrt(num_seeds)
    assert np.all(np.abs(means.mean(axis=0) - FILTER_MEANS) < 5 * se + 0.01)
    assert paths_x.shape == (num_seeds, n, T)


def test_rejuvenation_history_is_consistent():
    res = smc.particle_filter(jax.random.key(4), MODEL, ARGS, {"y": YS}, 32, ess_threshold=1.0,
                              rejuvenation=inference.mh("x"))
    boot = smc.particle_filter(jax.random.key(4), MODEL, ARGS, {"y": YS}, 32, ess_threshold=1.0)
    paths = res.paths()
    # Each path is one trajectory the filter built: its score is the model's log joint.
    log_joint = jax.vmap(lambda ch: MODEL.assess(ch, ARGS)[0])(paths.choices)
    np.testing.assert_allclose(log_joint, paths.score, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(paths["x"][:, -1], res.particles["x"])
    assert np.array_equal(res.ancestors[0], np.arange(32)) and np.array_equal(res.ancestors[-1], np.arange(32))
    # Moves after each resampling keep more distinct values of the second-to-last state.
    distinct = lambda r: len(np.unique(np.asarray(r.paths()["x"][:, -2])))  # noqa: E731
    assert distinct(res) > distinct(boot)


@pytest.fixture(scope="module")
def result():
    return smc.particle_filter(jax.random.key(3), MODEL, ARGS, {"y": YS}, 64)


def test_result_shapes_and_paths(result):
    n = 64
    assert result.log_marginal.shape == ()
    assert result.log_weights.shape == (n,)
    assert jnp.allclose(jax.scipy.special.logsumexp(result.log_weights), 0.0, atol=1e-5)
    ess = np.asarray(result.ess)
    assert ess.shape == (T,) and np.all((ess >= 1) & (ess <= n + 1e-3))
    assert result.ancestors.shape == (T, n) and result.ancestors.dtype == jnp.int32
    assert np.array_equal(result.ancestors[0], np.arange(n))
    assert result.particles["x"].shape == (n,)
    paths = result.paths()
    assert paths["x"].shape == (n, T) and paths["y"].shape == (n, T)
    assert paths.score.shape == (n,)
    assert np.array_equal(paths["x"][:, -1], result.particles["x"])
    assert np.array_equal(paths["y"], np.broadcast_to(YS, (n, T)))
    # Each path is one consistent trajectory: its score is the model's log joint of its
    # choices (a wrong genealogy would pair a step with another particle's carry).
    log_joint = jax.vmap(lambda ch: MODEL.assess(ch, ARGS)[0])(paths.choices)
    np.testing.assert_allclose(log_joint, paths.score, rtol=1e-4, atol=1e-3)
    # The result is a pytree: it passes through jit.
    again = jax.jit(lambda r: r)(result)
    assert np.array_equal(again.paths()["x"], paths["x"])


def test_resampling_schedule():
    always = smc.particle_filter(jax.random.key(0), MODEL, ARGS, {"y": YS}, 32, ess_threshold=1.0)
    never = smc.particle_filter(jax.random.key(0), MODEL, ARGS, {"y": YS}, 32, ess_threshold=0.0)
    assert not always.resampled[0] and bool(jnp.all(always.resampled[1:]))
    assert not bool(jnp.any(never.resampled))
    assert np.array_equal(never.ancestors, np.broadcast_to(np.arange(32), (T, 32)))
    # Without resampling the filter is importance sampling with the prior over the whole scan:
    # log Z-hat = logsumexp_i(sum_t log N(y_t; x_t^i, R)) - log N, and the final log weights
    # are those sums normalized.
    x = np.asarray(never.paths()["x"], np.float64)
    log_lik = (-0.5 * np.log(2 * np.pi * R**2) - 0.5 * ((np.asarray(YS) - x) / R) ** 2).sum(1)
    top = log_lik.max()
    log_z = top + np.log(np.exp(log_lik - top).sum()) - np.log(32)
    np.testing.assert_allclose(float(never.log_marginal), log_z, rtol=1e-5)
    np.testing.assert_allclose(never.log_weights, log_lik - log_z - np.log(32), atol=1e-3)
    adaptive = smc.particle_filter(jax.random.key(0), MODEL, ARGS, {"y": YS}, 32, ess_threshold=0.5)
    prev_ess = np.asarray(adaptive.ess)[:-1]
    np.testing.assert_array_equal(np.asarray(adaptive.resampled)[1:], prev_ess < 0.5 * 32)


def test_same_key_same_result_and_compile_once():
    a = smc.particle_filter(jax.random.key(5), MODEL, ARGS, {"y": YS}, 16, resampling="stratified")
    size = _filter._particle_filter._cache_size()
    b = smc.particle_filter(jax.random.key(5), MODEL, ARGS, {"y": YS + 1.0}, 16, resampling="stratified")
    c = smc.particle_filter(jax.random.key(5), MODEL, ARGS, {"y": YS}, 16, resampling="stratified")
    assert _filter._particle_filter._cache_size() == size  # new data, same shapes: no recompile
    assert a.log_marginal == c.log_marginal and np.array_equal(a.particles["x"], c.particles["x"])
    assert a.log_marginal != b.log_marginal


def test_carry_pytree_and_inputs():
    # A pytree carry (position, velocity) and per-step inputs xs (a drift per step).
    @ppl.gen
    def step(state, drift):
        pos, vel = state
        vel = ppl.sample("vel", dist.Normal(vel, 0.1))
        pos = ppl.sample("pos", dist.Normal(pos + vel + drift, 0.1))
        ppl.sample("obs", dist.Normal(pos, 1.0))
        return (pos, vel), pos

    model = ppl.scan(step)
    drift = jnp.linspace(0.0, 1.0, 12)
    sim = model.simulate(jax.random.key(0), ((0.0, 0.0), drift))
    res = smc.particle_filter(jax.random.key(1), model, ((0.0, 0.0), drift), {"obs": sim["obs"]}, 50)
    paths = res.paths()
    assert paths["pos"].shape == (50, 12) and paths["vel"].shape == (50, 12)
    assert np.isfinite(res.log_marginal)
    final_pos, _ = paths.retval[0]
    np.testing.assert_array_equal(final_pos, paths["pos"][:, -1])


# -- resamplers ---------------------------------------------------------------------------------

RESAMPLERS = {"multinomial": smc.multinomial, "systematic": smc.systematic,
              "stratified": smc.stratified, "residual": smc.residual}


def offspring_counts(resampler, weights, n, num_keys, seed=0):
    """[num_keys, N] offspring counts of `n` draws under independent keys."""
    log_w = jnp.log(jnp.asarray(weights, jnp.float32))
    keys = jax.random.split(jax.random.key(seed), num_keys)
    ancestors = jax.jit(jax.vmap(lambda k: resampler(k, log_w, n)))(keys)
    assert ancestors.shape == (num_keys, n) and ancestors.dtype == jnp.int32
    counts = jax.vmap(lambda a: jnp.bincount(a, length=len(weights)))(ancestors)
    return np.asarray(counts, np.float64)


def check_laws(weights, n, num_keys, seed=0):
    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    multinomial_var = n * w * (1 - w)  # exact Var[count_i] under multinomial resampling
    for name, resampler in RESAMPLERS.items():
        counts = offspring_counts(resampler, w, n, num_keys, seed)
        assert np.all(counts.sum(1) == n), name
        # Unbiased: E[count_i] = n w_i. Every scheme's Var[count_i] is at most the
        # multinomial one, so 5 multinomial standard errors bound the mean's error.
        se = np.sqrt(multinomial_var / num_keys)
        assert np.all(np.abs(counts.mean(0) - n * w) <= 5 * se + 1e-9), (name, counts.mean(0), n * w)
        if name != "multinomial":
            # Lower variance than multinomial: empirical variance within 5 of its standard
            # errors ((m4 - var^2) / K) of a value at most the exact multinomial variance.
            var = counts.var(0)
            m4 = ((counts - counts.mean(0)) ** 4).mean(0)
            se_var = np.sqrt(np.maximum(m4 - var**2, 0.0) / num_keys)
            assert var.sum() <= multinomial_var.sum() + 5 * se_var.sum() + 1e-9, name


def test_resamplers_unbiased_and_low_variance():
    weights = [0.05, 0.1, 0.15, 0.3, 0.4]
    check_laws(weights, n=7, num_keys=4000)
    w = np.asarray(weights) / np.sum(weights)
    mult = offspring_counts(smc.multinomial, w, 7, 4000).var(0).sum()
    for name in ("systematic", "stratified", "residual"):  # strictly lower here, by a margin
        assert offspring_counts(RESAMPLERS[name], w, 7, 4000).var(0).sum() < 0.8 * mult, name


@settings(max_examples=4, deadline=None)
@given(weights=st.lists(st.floats(0.02, 1.0), min_size=2, max_size=6),
       extra=st.integers(0, 4), seed=st.integers(0, 1000))
@pytest.mark.slow  # heavy for the 15-minute CI budget: pytest -m slow runs it
def test_resamplers_unbiased_on_generated_weights(weights, extra, seed):
    check_laws(weights, n=len(weights) + extra, num_keys=2000, seed=seed)


def test_systematic_counts_are_floor_or_ceil_and_stratified_within_one_per_stratum():
    """Systematic: count_i in {floor(n w_i), ceil(n w_i)} (up to float32 rounding of the
    cdf, hence the 1e-4); stratified: count_i within the strata its interval touches."""
    w = np.asarray(jax.random.dirichlet(jax.random.key(3), jnp.ones(50)), np.float64)
    for n in (50, 173):
        counts = offspring_counts(smc.systematic, w, n, 200)
        assert np.all(counts >= np.floor(n * w - 1e-4)) and np.all(counts <= np.ceil(n * w + 1e-4))
        counts = offspring_counts(smc.stratified, w, n, 200)
        cdf = np.concatenate([[0.0], np.cumsum(w)])
        touched = np.ceil(n * cdf[1:] + 1e-4) - np.floor(n * cdf[:-1] - 1e-4)
        assert np.all(counts <= touched)


def test_resamplers_shapes_zero_weights_and_jit():
    log_w = jnp.log(jnp.array([0.0, 0.5, 0.0, 0.5]))
    for name, resampler in RESAMPLERS.items():
        a = resampler(jax.random.key(1), log_w, 10)
        assert a.shape == (10,) and a.dtype == jnp.int32, name
        assert set(np.asarray(a).tolist()) <= {1, 3}, name  # zero weight: never drawn
        np.testing.assert_array_equal(a, jax.jit(resampler, static_argnums=2)(jax.random.key(1), log_w, 10))
        dead = resampler(jax.random.key(1), jnp.full((4,), -jnp.inf), 6)  # no NaN, valid indices
        assert np.all((np.asarray(dead) >= 0) & (np.asarray(dead) < 4)), name


# -- errors -----------------------------------------------------------------------------------


# -- history="choices": the same run without the carries ----------------------------------------

BUFFER = 7  # a carry leaf no choice has the shape of: the last BUFFER states


@ppl.gen
def buffered_step(carry, _):
    x_prev, recent, done = carry
    x, stop = ppl.sample("s", ppl.mask(buffered_move), ~done, x_prev)
    x = jnp.where(done, x_prev, x)
    recent = jnp.where(done, recent, jnp.roll(recent, 1).at[0].set(x))
    return (x, recent, done | stop), x


@ppl.gen
def buffered_move(x_prev):
    x = ppl.sample("x", dist.Normal(A * x_prev, Q))
    ppl.sample("y", dist.Normal(x, R))
    ppl.factor("recent", -0.1 * x**2)
    return x, ppl.sample("stop", dist.Bernoulli(probs=0.05)).astype(bool)


BUFFERED = ppl.scan(buffered_step, length=T)
BUFFERED_ARGS = ((jnp.float32(0.0), jnp.zeros(BUFFER), jnp.bool_(False)), None)
BUFFERED_OBS = {"s": {"y": YS}}


@pytest.mark.parametrize("options", [
    {},
    {"ess_threshold": 1.0, "resampling": "multinomial", "is_finished": lambda c: c[2]},
    pytest.param({"ess_threshold": 1.0, "rejuvenation": inference.mh(("s", "x"))}, marks=pytest.mark.slow),
], ids=["plain", "is_finished", "rejuvenation"])
def test_choices_history_is_the_same_run_without_carries(options):
    full = smc.particle_filter(jax.random.key(8), BUFFERED, BUFFERED_ARGS, BUFFERED_OBS, 24, **options)
    light = smc.particle_filter(jax.random.key(8), BUFFERED, BUFFERED_ARGS, BUFFERED_OBS, 24, history="choices",
                                **options)
    assert (full.history, light.history) == ("traces", "choices")
    # the same run, bit for bit
    for name in ("log_marginal", "log_weights", "ancestors", "ess", "resampled", "step_log_weights"):
        np.testing.assert_array_equal(getattr(light, name), getattr(full, name), err_msg=name)
    if "is_finished" in options:
        np.testing.assert_array_equal(light.is_finished, full.is_finished)
        assert light.is_finished.any()  # some particles did stop
    else:
        assert light.is_finished is None
    steps, kept = full.step_particles, light.step_particles
    jax.tree.map(np.testing.assert_array_equal, kept.choices, steps.choices)
    np.testing.assert_array_equal(kept.score, steps.score)
    np.testing.assert_array_equal(kept[("s", "recent")], steps[("s", "recent")])  # factor values are kept
    np.testing.assert_array_equal(light.particles[("s", "x")], full.particles[("s", "x")])
    # no carry: every kept leaf is a choice, a score or a factor value ([T, N] or [T]),
    # none has the carry buffer's shape; the full history holds it (args and retval)
    assert all(leaf.shape in ((T, 24), (T,)) for leaf in jax.tree.leaves(light._steps))
    assert any(leaf.shape[-1:] == (BUFFER,) for leaf in jax.tree.leaves(full._steps))
    # paths(): the same trajectories, recomputed from the choices
    a, b = full.paths(), light.paths()
    jax.tree.map(np.testing.assert_array_equal, b.choices, a.choices)
    np.testing.assert_array_equal(b.retval[0][1], a.retval[0][1])  # the final buffers
    np.testing.assert_allclose(b.score, a.score, rtol=1e-5, atol=1e-4)


def test_choices_history_errors_name_the_option():
    light = smc.particle_filter(jax.random.key(0), MODEL, ARGS, {"y": YS}, 8, history="choices")
    with pytest.raises(ppl.ArgumentError, match="history='choices'.*history='traces'"):
        light.particles.retval
    with pytest.raises(ppl.ArgumentError, match="history='traces'"):
        smc.backward_simulation(jax.random.key(1), light, 4)
    with pytest.raises(ppl.UnknownAddressError, match="no value at 'z'.*Did you mean"):
        light.particles["z"]
    with pytest.raises(ppl.ArgumentError, match="history must be 'traces'.*'choices'"):
        smc.particle_filter(jax.random.key(0), MODEL, ARGS, {"y": YS}, 8, history="carries")
    # the result is a pytree (through jit), with its history kind
    assert jax.jit(lambda r: r)(light).history == "choices"


def test_error_model_not_a_scan():
    with pytest.raises(ppl.ArgumentError, match=r"ppl\.scan\(kernel, length=T\)"):
        smc.particle_filter(jax.random.key(0), lgss_step, (0.0, None), {"y": YS}, 10)


def test_error_observations_wrong_length():
    with pytest.raises(ppl.ObservationError, match=f"leading axis of length {T}"):
        smc.particle_filter(jax.random.key(0), MODEL, ARGS, {"y": YS[:-1]}, 10)


def test_error_threshold_and_resampling_name_and_rejuvenation():
    for bad in (-0.1, 1.5):
        with pytest.raises(ppl.ArgumentError, match=r"ess_threshold must lie in \[0, 1\]"):
            smc.particle_filter(jax.random.key(0), MODEL, ARGS, {"y": YS}, 10, ess_threshold=bad)
    with pytest.raises(ppl.ArgumentError, match="unknown resampling 'sytematic'.*'systematic'"):
        smc.particle_filter(jax.random.key(0), MODEL, ARGS, {"y": YS}, 10, resampling="sytematic")
    with pytest.raises(ppl.ArgumentError, match="rejuvenation must be an inference.Kernel"):
        smc.particle_filter(jax.random.key(0), MODEL, ARGS, {"y": YS}, 10, rejuvenation=object())
    with pytest.raises(ppl.ArgumentError, match="ess_threshold=0.0 never resamples"):
        smc.particle_filter(jax.random.key(0), MODEL, ARGS, {"y": YS}, 10, ess_threshold=0.0,
                            rejuvenation=inference.mh("x"))


@ppl.gen
def boxed_step(x_prev, _):
    x = ppl.sample("x", dist.Normal(A * x_prev, Q))
    ppl.sample("y", dist.Uniform(x - 3.0, x + 3.0))  # support depends on x: checked at run time
    return x, None


def test_error_all_weights_dead_names_step_and_site():
    model = ppl.scan(boxed_step, length=10)
    ys = jnp.zeros(10).at[7].set(100.0)  # no particle can reach y = 100 at step 7
    for history in ("traces", "choices"):
        with pytest.raises(ppl.InferenceError, match=r"at step 7 .*all 20 particles have log weight -inf.*'y'"):
            smc.particle_filter(jax.random.key(0), model, (0.0, None), {"y": ys}, 20, history=history)
    # Under jit: no exception, no NaN; the step is reported in the result.
    res = jax.jit(lambda k: smc.particle_filter(k, model, (0.0, None), {"y": ys}, 20))(jax.random.key(0))
    assert int(res.degenerate_step) == 7
    assert res.log_marginal == -jnp.inf
    assert not np.any(np.isnan(res.log_weights)) and not np.any(np.isnan(res.ess))
    assert float(res.ess[7]) == 0.0


def test_docstring_examples_run():
    globs = {"jax": jax, "jnp": jnp}
    for module in (_filter, _resampling):
        failures, attempted = doctest.testmod(module, extraglobs=globs, optionflags=doctest.ELLIPSIS)
        assert attempted > 0 and failures == 0, module.__name__
