"""smc.csmc, particle Gibbs and backward simulation against the exact Kalman / RTS smoother.

Model: the linear-Gaussian state-space model x_t = a x_{t-1} + N(0, Q^2) (x_{-1} = 0, the
scan's initial carry), y_t = x_t + N(0, R^2), t = 0..T-1. Its filtering, smoothing and
parameter posteriors are exact (Kalman filter, Rauch-Tung-Striebel smoother, and the
Kalman likelihood on a grid of a), computed in float64 numpy (tests/models.py).

Statistical checks state their tolerance from the Monte Carlo error: independent chains
(or filter runs) give independent estimates, whose spread gives the standard error; a
check at 5 standard errors has a false-alarm rate below 1e-5 per compared quantity
(a t-statistic with >= 15 degrees of freedom: below 3e-4), and the seeds are fixed.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from numpyro.diagnostics import effective_sample_size

import inference
import ppl
import smc

from models import A, Q, R, kalman, lgss_step  # noqa: F401  (A, Q, R: the model's constants)

T = 20
MODEL = ppl.scan(lgss_step, length=T)
ARGS = (0.0, None)
YS = MODEL.simulate(jax.random.key(42), ARGS)["y"]
EXACT = kalman(YS)


def exact_smoothing_draws(rng, num, ys=YS, a=A):
    """`num` exact draws [num, T] of p(x | ys), by backward sampling on the Kalman filter."""
    k = kalman(ys, a)
    m, p, pv = k["filter_means"], k["filter_vars"], k["pred_vars"]
    x = np.empty((num, len(m)))
    x[:, -1] = m[-1] + math.sqrt(p[-1]) * rng.standard_normal(num)
    for t in range(len(m) - 2, -1, -1):
        j = p[t] * a / pv[t + 1]
        mean = m[t] + j * (x[:, t + 1] - a * m[t])
        x[:, t] = mean + math.sqrt(p[t] - j**2 * pv[t + 1]) * rng.standard_normal(num)
    return x


def assert_moments(draws_per_run, means, variances, extra=0.0, z=5.0):
    """Runs' means of x_t and of (x_t - mean_t)^2 [runs, T] against exact moments, at `z`
    standard errors of the across-run average (plus `extra` standard deviations)."""
    runs = draws_per_run.shape[0]
    first = draws_per_run.mean(axis=1)
    second = ((draws_per_run - means) ** 2).mean(axis=1)
    se1 = first.std(axis=0, ddof=1) / math.sqrt(runs)
    se2 = second.std(axis=0, ddof=1) / math.sqrt(runs)
    err1 = np.abs(first.mean(axis=0) - means)
    err2 = np.abs(second.mean(axis=0) - variances)
    sd = np.sqrt(variances)
    assert np.all(err1 < z * se1 + extra * sd), f"means: error / se = {(err1 / se1).round(1).tolist()}"
    assert np.all(err2 < z * se2 + extra * variances), f"variances: error / se = {(err2 / se2).round(1).tolist()}"
    return err1 / se1, err2 / se2


# -- conditional SMC: one call ----------------------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    trace, _ = MODEL.generate(jax.random.key(1), {"y": YS}, ARGS)
    return trace


def test_csmc_shapes_and_the_reference_survives(reference):
    n = 6
    res = smc.csmc(jax.random.key(2), MODEL, ARGS, {"y": YS}, reference, n)
    assert res.trajectory["x"].shape == (T,)
    assert res.log_weights.shape == (n,) and res.ancestors.shape == (T, n) and res.index.shape == ()
    assert res.filter.ess.shape == (T,) and res.filter.step_log_weights.shape == (T, n)
    assert int(res.carry_mismatch_step) == -1 and int(res.filter.degenerate_step) == -1
    # Without ancestor sampling particle 0 descends from particle 0: its path is the reference.
    assert np.all(np.asarray(res.ancestors[:, 0]) == 0)
    np.testing.assert_array_equal(res.filter.paths()["x"][0], reference["x"])
    # The trajectory is a trace of the model: its score is the joint density of its choices,
    # its observations are the data, and it is the path of the drawn particle.
    np.testing.assert_allclose(res.trajectory.score, MODEL.assess(res.trajectory.choices, ARGS)[0], rtol=1e-5)
    np.testing.assert_array_equal(res.trajectory["y"], YS)
    np.testing.assert_array_equal(res.trajectory["x"], res.filter.paths()["x"][int(res.index)])
    # A reference given as its latent choices gives the same result; same key, same draw.
    again = smc.csmc(jax.random.key(2), MODEL, ARGS, {"y": YS}, {"x": reference["x"]}, n)
    np.testing.assert_array_equal(again.trajectory["x"], res.trajectory["x"])


def test_csmc_ancestor_sampling_breaks_the_reference_lineage(reference):
    res = smc.csmc(jax.random.key(3), MODEL, ARGS, {"y": YS}, reference, 6, ancestor_sampling=True)
    assert np.any(np.asarray(res.ancestors[1:, 0]) != 0)  # the reference took other parents
    # The reference's choices are kept at every step, whatever its ancestors.
    steps = jax.tree.map(lambda leaf: leaf[:, 0], res.filter._steps)
    np.testing.assert_array_equal(steps.choices["x"], reference["x"])
    np.testing.assert_allclose(res.trajectory.score, MODEL.assess(res.trajectory.choices, ARGS)[0], rtol=1e-5)


def test_csmc_under_jit_and_vmap(reference):
    def one(key):
        return smc.csmc(key, MODEL, ARGS, {"y": YS}, reference, 4, ancestor_sampling=True).trajectory["x"]

    xs = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(4), 3))
    assert xs.shape == (3, T)
    np.testing.assert_array_equal(xs[1], one(jax.random.split(jax.random.key(4), 3)[1]))


# -- iterated conditional SMC leaves the smoothing distribution invariant ------------------


NUM_CHAINS, NUM_ITERS, N_SMALL = 128, 60, 5


@jax.jit
def _stationary_traces(xs):
    return jax.vmap(lambda x: MODEL.generate(jax.random.key(0), {"x": x, "y": YS}, ARGS)[0])(xs)


def run_chains(kernel, traces, num_iters, key, observed=("y",)):
    """`num_iters` steps of `kernel` from each of the batch of `traces`; draws of x
    [chains, num_iters, T]."""

    @jax.jit
    def run(key, traces):
        def chain(k, trace):
            def body(state, k):
                state, _ = kernel.step(k, state)
                return state, state.trace.choices["x"]

            state = kernel.init(trace, observed=observed)
            return jax.lax.scan(body, state, jax.random.split(k, num_iters))[1]

        return jax.vmap(chain)(jax.random.split(key, traces.score.shape[0]), traces)

    return np.asarray(run(key, traces), np.float64)


@pytest.fixture(scope="module", params=[False, True], ids=["csmc", "csmc_as"])
def iterated(request):
    # Chains start at exact smoothing draws; an invariant kernel keeps every later state
    # an exact draw (however slowly it mixes), so the chains' averages are unbiased and
    # their spread over independent chains gives the standard error.
    starts = exact_smoothing_draws(np.random.default_rng(5), NUM_CHAINS)
    traces = _stationary_traces(jnp.asarray(starts, jnp.float32))
    kernel = smc.csmc_kernel(N_SMALL, ancestor_sampling=request.param)
    return request.param, run_chains(kernel, traces, NUM_ITERS, jax.random.key(6 + request.param))


def test_iterated_csmc_keeps_the_smoothing_distribution(iterated):
    _, draws = iterated
    assert_moments(draws, EXACT["means"], EXACT["variances"])


def test_ancestor_sampling_moves_the_first_state_more(iterated):
    # With N = 5 particles over T = 20 steps the genealogy of a conditional filter has
    # collapsed onto the reference by t = 0: without ancestor sampling x_0 almost never
    # changes; with it, x_0 is redrawn at most iterations.
    is_as, draws = iterated
    moved = np.mean(draws[:, 1:, 0] != draws[:, :-1, 0])
    # Measured at these seeds: 0.58 with ancestor sampling, 0.0 without.
    if is_as:
        assert moved > 0.3, moved
    else:
        assert moved < 0.05, moved


# -- backward simulation ----------------------------------------------------------------------


def test_backward_simulation_matches_the_rts_smoother():
    # Each filter run's M trajectories average to an estimate of the smoothing moments; the
    # runs are independent, so their spread gives the s.e. The estimator's bias is O(1/N),
    # below 0.05 standard deviations at N = 200.
    num_runs, n, m = 16, 200, 64

    @jax.jit
    def one(key):
        k_filter, k_back = jax.random.split(key)
        res = smc.particle_filter(k_filter, MODEL, ARGS, {"y": YS}, n)
        traj = smc.backward_simulation(k_back, res, m)
        return traj["x"], traj.score, traj.choices

    xs, scores, choices = jax.vmap(one)(jax.random.split(jax.random.key(7), num_runs))
    assert xs.shape == (num_runs, m, T)
    np.testing.assert_array_equal(choices["y"], np.broadcast_to(YS, (num_runs, m, T)))
    lp = jax.vmap(jax.vmap(lambda c: MODEL.assess(c, ARGS)[0]))(choices)
    np.testing.assert_allclose(scores, lp, rtol=1e-4)
    assert_moments(np.asarray(xs, np.float64), EXACT["means"], EXACT["variances"], extra=0.05)


def test_backward_simulation_spreads_the_early_states():
    # paths() follows the genealogy and collapses at early steps; backward simulation draws
    # each state from all N particles of its step.
    res = smc.particle_filter(jax.random.key(8), MODEL, ARGS, {"y": YS}, 50, ess_threshold=1.0)
    smoothed = smc.backward_simulation(jax.random.key(9), res, 50)
    distinct = lambda x: len(np.unique(np.asarray(x)))  # noqa: E731
    assert distinct(smoothed["x"][:, 0]) > 2 * distinct(res.paths()["x"][:, 0])


# -- particle Gibbs: an unknown transition coefficient -----------------------------------------


@ppl.gen
def lg_step_a(carry, _):
    x_prev, a = carry
    x = ppl.sample("x", dist.Normal(a * x_prev, Q))
    ppl.sample("y", dist.Normal(x, R))
    return (x, a), None


T_PG = 30


@ppl.gen
def lg_with_a():
    a = ppl.sample("a", dist.Uniform(-1.0, 1.0))
    return ppl.sample("states", ppl.scan(lg_step_a, length=T_PG), (0.0, a), None)


A_TRUE = 0.6
YS_PG = ppl.scan(lg_step_a, length=T_PG).simulate(jax.random.key(10), ((0.0, A_TRUE), None))["y"]


def exact_a_posterior(ys):
    """Mean and sd of p(a | ys) under the Uniform(-1, 1) prior: the Kalman likelihood on a
    fine grid (the density is smooth; the grid error is far below the MC error)."""
    grid = np.linspace(-1.0, 1.0, 4001)[1:-1]
    log_post = np.array([kalman(ys, a)["log_lik"] for a in grid])
    w = np.exp(log_post - log_post.max())
    w /= w.sum()
    mean = float(np.sum(w * grid))
    return mean, float(np.sqrt(np.sum(w * (grid - mean) ** 2)))


def test_particle_gibbs_parameter_posterior():
    exact_mean, exact_sd = exact_a_posterior(YS_PG)
    kernel = smc.particle_gibbs("states", inference.mh("a"), 10, ancestor_sampling=True)
    samples = inference.run_mcmc(jax.random.key(11), kernel, lg_with_a, (), {"states": {"y": YS_PG}},
                                 num_warmup=150, num_samples=400, num_chains=16, progress_bar=False)
    a = np.asarray(samples["a"], np.float64)  # [chains, draws]
    assert samples[("states", "x")].shape == (16, 400, T_PG)
    chain_means = a.mean(axis=1)
    se = chain_means.std(ddof=1) / math.sqrt(len(chain_means))
    assert abs(chain_means.mean() - exact_mean) < 5 * se, (chain_means.mean(), exact_mean, se)
    ess = float(effective_sample_size(a))
    assert ess > 200, ess
    assert abs(a.std() - exact_sd) < 5 * exact_sd / math.sqrt(2 * ess), (a.std(), exact_sd, ess)
    info = samples.info
    assert info.csmc.num_steps_moved.shape == (16, 400) and not np.any(np.asarray(info.csmc.carry_mismatch))
    assert 0.05 < float(np.mean(info.params.is_accepted)) < 0.95


# -- errors ---------------------------------------------------------------------------------


def test_error_reference_of_the_wrong_length(reference):
    with pytest.raises(ppl.ArgumentError, match=r"reference trajectory at 'x' has shape \(12,\).*expected a leading "
                                                r"axis of length 20"):
        smc.csmc(jax.random.key(0), MODEL, ARGS, {"y": YS}, {"x": reference["x"][:12]}, 4)


def test_error_reference_without_a_latent_choice():
    with pytest.raises(ppl.ArgumentError, match=r"no value at 'x'"):
        smc.csmc(jax.random.key(0), MODEL, ARGS, {"y": YS}, {}, 4)


def test_error_model_not_a_scan(reference):
    with pytest.raises(ppl.ArgumentError, match=r"must be a state-space model written as ppl.scan"):
        smc.csmc(jax.random.key(0), lg_with_a, (), {"y": YS}, reference, 4)


def test_error_particle_gibbs_address_not_a_scan():
    kernel = smc.particle_gibbs("a", inference.mh("a"), 4)
    trace, _ = lg_with_a.generate(jax.random.key(0), {"states": {"y": YS_PG}}, ())
    with pytest.raises(ppl.ArgumentError, match=r"expected a state-space model: a ppl.scan at 'a'"):
        kernel.init(trace, observed={"states": {"y": YS_PG}})


def test_error_num_particles_and_kernel():
    with pytest.raises(ppl.ArgumentError, match=r"num_particles must be an int >= 2"):
        smc.csmc_kernel(1)
    with pytest.raises(ppl.ArgumentError, match=r"kernel must be an inference.Kernel"):
        smc.particle_gibbs("states", "a", 4)


@ppl.gen
def running_sum_step(total, _):
    """A carry that depends on the previous carry beyond the step's choice."""
    x = ppl.sample("x", dist.Normal(0.0, 1.0))
    ppl.sample("y", dist.Normal(total + x, R))
    return total + x, None


def test_error_ancestor_sampling_and_backward_simulation_need_a_markov_carry():
    model = ppl.scan(running_sum_step, length=5)
    ys = jnp.arange(5.0)
    ref, _ = model.generate(jax.random.key(0), {"y": ys}, ARGS)
    smc.csmc(jax.random.key(1), model, ARGS, {"y": ys}, ref, 4)  # without ancestor sampling: valid
    with pytest.raises(ppl.InferenceError, match=r"new carry that depends on the previous carry"):
        smc.csmc(jax.random.key(1), model, ARGS, {"y": ys}, ref, 4, ancestor_sampling=True)
    res = smc.particle_filter(jax.random.key(2), model, ARGS, {"y": ys}, 16)
    with pytest.raises(ppl.InferenceError, match=r"new carry that depends on the previous carry"):
        smc.backward_simulation(jax.random.key(3), res, 4)


# -- simulation-based calibration of particle Gibbs ----------------------------------------------
#
# As tests/test_sbc.py: for each of R replications draw (a*, x*) from the prior and y given
# them, then place the truth at a uniform index K of a chain of L + 1 states: K steps forward
# with the particle Gibbs sweep P = (conditional SMC, then MH on a), L - K steps backward
# with its time reversal P* = (MH on a, then conditional SMC) (both parts are reversible).
# The L + 1 states are then a stationary chain with the truth at an independent uniform
# position, so the truth's rank among the other L states is exactly uniform on 0..L. Ties
# (an MH rejection, or a state conditional SMC did not move) are broken at random.
# A coarse check, marked slow: a planted bug in the reference's weight (its prior density
# counted in its weight) passes it at this size (chi-square 9-16), while the invariance
# test above fails it at 25 standard errors.

R_SBC, L_SBC, THIN_SBC, T_SBC, N_SBC = 400, 9, 2, 10, 5
CHI2_999 = 27.88  # chi-square(9) quantile 0.999


@ppl.gen
def lg_with_a_short():
    a = ppl.sample("a", dist.Uniform(-1.0, 1.0))
    return ppl.sample("states", ppl.scan(lg_step_a, length=T_SBC), (0.0, a), None)


def sbc_ranks(forward, backward, key):
    """Ranks [R, 2] of a* and of x*_0 among L chain states."""
    observed = {"states": {"y": jnp.zeros(T_SBC)}}

    def one(key):
        k_truth, k_pos, k_fwd, k_bwd, k_tie = jax.random.split(key, 5)
        truth = lg_with_a_short.simulate(k_truth, ())
        stats = lambda tr: jnp.stack([tr["a"], tr[("states", "x")][0]])  # noqa: E731

        def chain(kernel, k):
            def body(s, k):
                for k_step in jax.random.split(k, THIN_SBC):
                    s, _ = kernel.step(k_step, s)
                return s, stats(s.trace)

            return jax.lax.scan(body, kernel.init(truth, observed=observed), jax.random.split(k, L_SBC))[1]

        others = jnp.concatenate([chain(forward, k_fwd), chain(backward, k_bwd)])  # [2L, 2]
        position = jax.random.randint(k_pos, (), 0, L_SBC + 1)
        steps = jnp.arange(L_SBC)
        counted = jnp.concatenate([steps < position, steps < L_SBC - position])[:, None]
        below = jnp.sum(counted & (others < stats(truth)), axis=0)
        ties = jnp.sum(counted & (others == stats(truth)), axis=0)
        return below + jax.random.randint(k_tie, (2,), 0, ties + 1)

    return np.asarray(jax.jit(jax.vmap(one))(jax.random.split(key, R_SBC)))


@pytest.mark.slow
@pytest.mark.parametrize("ancestor_sampling", [False, True], ids=["pg", "pgas"])
def test_particle_gibbs_simulation_based_calibration(ancestor_sampling):
    states = smc.csmc_kernel(N_SBC, address="states", ancestor_sampling=ancestor_sampling)
    forward = smc.particle_gibbs("states", inference.mh("a"), N_SBC, ancestor_sampling=ancestor_sampling)
    backward = inference.cycle(inference.mh("a"), states)
    ranks = sbc_ranks(forward, backward, jax.random.key(12))
    for column, name in enumerate(["a", "x_0"]):
        counts = np.bincount(ranks[:, column], minlength=L_SBC + 1)
        expected = R_SBC / (L_SBC + 1)
        stat = float(((counts - expected) ** 2 / expected).sum())
        assert stat < CHI2_999, f"{name}: chi-square {stat:.1f} >= {CHI2_999}; rank counts {counts.tolist()}"
