"""smc.particle_filter with particles that finish early (ppl.mask + a done flag in the carry).

Truth: a three-state hidden Markov model whose particles stop at a random, state-dependent
step. Its evidence, with the steps after stopping adding nothing, is an exact forward
recursion over (state, still running).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import inference
import ppl
import smc

# z_t | z_{t-1} ~ P[z_{t-1}], y_t | z_t ~ N(MU[z_t], 1), stop_t | z_t ~ Bernoulli(STOP[z_t]);
# z_{-1} = 0. After the step that draws stop_t = 1 the particle is finished: later steps
# are masked (no density, no weight) and its carry stays.
P = jnp.array([[0.8, 0.15, 0.05], [0.1, 0.8, 0.1], [0.05, 0.15, 0.8]])
MU = jnp.array([-1.5, 0.0, 1.5])
STOP = jnp.array([0.02, 0.1, 0.3])
T = 25


@ppl.gen
def running(z_prev):
    z = ppl.sample("z", dist.Categorical(probs=P[z_prev]))
    ppl.sample("y", dist.Normal(MU[z], 1.0))
    stop = ppl.sample("stop", dist.Bernoulli(probs=STOP[z]))
    return z, stop.astype(bool)


@ppl.gen
def step(carry, _):
    z_prev, done = carry
    z, stop = ppl.sample("s", ppl.mask(running), ~done, z_prev)
    new = (jnp.where(done, z_prev, z), done | stop)
    return new, new  # the per-step output is the carry, so paths() shows it


MODEL = ppl.scan(step, length=T)
ARGS = ((jnp.int32(0), jnp.bool_(False)), None)
# Observations from a run that does not stop (a finished particle ignores the rest).
YS = MU[jnp.array([0] * 8 + [1] * 8 + [2] * 9)] + jax.random.normal(jax.random.key(3), (T,))
OBS = {"s": {"y": YS}}


def is_finished(carry):
    return carry[1]


def exact_log_evidence(ys):
    """log sum over runs of prod over running steps of P * N(y) * Bernoulli(stop) (float64)."""
    p, mu, q = (np.asarray(a, np.float64) for a in (P, MU, STOP))
    running_mass, finished_mass = np.eye(3)[0], 0.0
    for y in np.asarray(ys, np.float64):
        joint = (running_mass @ p) * np.exp(-0.5 * (y - mu) ** 2) / math.sqrt(2 * math.pi)
        finished_mass += joint @ q
        running_mass = joint * (1 - q)
    return math.log(finished_mass + running_mass.sum())


EXACT = exact_log_evidence(YS)


def run_seeds(num_seeds, n, seed, **kwargs):
    # One jit called per key: compiling the vmapped filter costs several times more.
    one = jax.jit(lambda key: smc.particle_filter(key, MODEL, ARGS, OBS, n, is_finished=is_finished,
                                                  **kwargs).log_marginal)
    return np.array([float(one(k)) for k in jax.random.split(jax.random.key(seed), num_seeds)])


def check_evidence(lz):
    # log Z-hat: 5 standard errors of the mean over seeds plus its -Var/2 bias (false alarm ~1e-6).
    sd = lz.std(ddof=1)
    assert abs(lz.mean() - EXACT) < 5 * sd / math.sqrt(len(lz)) + sd**2 / 2 + 1e-4 * abs(EXACT)
    assert sd < 0.5


def test_finished_particles_freeze_weight_and_carry():
    # Without resampling each path is one particle, so its final weight is the product of
    # the y-densities of its running steps alone (the bootstrap proposal draws z and stop
    # from the prior), and nothing about it changes after it stops.
    res = smc.particle_filter(jax.random.key(0), MODEL, ARGS, OBS, 400, ess_threshold=0.0,
                              is_finished=is_finished)
    paths = res.paths()
    z, done = (np.asarray(a) for a in paths.retval[1])  # carries after each step, [N, T]
    stops = np.asarray(paths["s", "stop"], bool)
    assert 0.2 < done[:, -1].mean() < 0.95  # some particles stop, some run to the end
    was_running = np.concatenate([np.ones((400, 1), bool), ~done[:, :-1]], axis=1)
    np.testing.assert_array_equal(done, np.logical_or.accumulate(stops & was_running, axis=1))
    np.testing.assert_array_equal(np.asarray(res.is_finished).T, done)  # no resampling: same order
    finish = np.where(done[:, -1], np.argmax(done, axis=1), T)
    for j in np.flatnonzero(done[:, -1])[:50]:
        assert np.all(z[j, finish[j]:] == z[j, finish[j]]) and np.all(done[j, finish[j]:])
    # Masked steps add nothing to the path's log joint: its score sums the running steps.
    zs, z_prev = np.asarray(paths["s", "z"]), np.concatenate([np.zeros((400, 1), int), z[:, :-1]], axis=1)
    log_y = np.asarray(dist.Normal(MU[zs], 1.0).log_prob(YS))
    log_step = np.log(np.asarray(P)[z_prev, zs]) + log_y + np.where(
        stops, np.log(np.asarray(STOP)[zs]), np.log1p(-np.asarray(STOP)[zs]))
    np.testing.assert_allclose(paths.score, np.where(was_running, log_step, 0.0).sum(1), rtol=1e-4, atol=1e-3)
    # Weights: the y log-densities of the running steps only.
    log_lik = np.where(was_running, log_y, 0.0).sum(1)
    expected = log_lik - np.logaddexp.reduce(log_lik)
    np.testing.assert_allclose(res.log_weights, expected, rtol=1e-4, atol=1e-3)
    # The weight of a particle stays fixed after it finishes: later steps only renormalize.
    step_w = np.asarray(res.step_log_weights)  # [T, N]
    for j in np.flatnonzero(finish < T - 1)[:20]:
        shift = step_w[finish[j]:, j] - step_w[finish[j], j]
        ref = step_w[finish[j]:, finish == finish[j]] - step_w[finish[j], finish == finish[j]]
        np.testing.assert_allclose(shift, ref[:, 0], atol=1e-4)


def test_evidence_matches_forward_recursion():
    check_evidence(run_seeds(20, 500, seed=1))
    check_evidence(run_seeds(20, 500, seed=2, ess_threshold=1.0, resampling="multinomial"))


def test_all_finished_skips_steps_under_jit_with_rejuvenation():
    # A model where every particle stops by step 6: from then on the filter runs no kernel
    # and no resampling; the evidence, weights and carries stay as they were.
    @ppl.gen
    def quick_stop(carry, t):
        z_prev, done = carry
        z, stop = ppl.sample("s", ppl.mask(running), ~done, z_prev)
        stop = stop | (t >= 5)
        new = (jnp.where(done, z_prev, z), done | stop)
        return new, new

    model = ppl.scan(quick_stop, length=T)
    args = (ARGS[0], jnp.arange(T))

    def run(key):
        return smc.particle_filter(key, model, args, OBS, 200, ess_threshold=1.0,
                                   rejuvenation=inference.mh(("s", "z")), is_finished=is_finished)

    run = jax.jit(run)
    res = run(jax.random.key(6))
    assert np.all(np.asarray(res.is_finished)[5:]) and not np.any(np.asarray(res.resampled)[7:])
    step_w = np.asarray(res.step_log_weights)
    np.testing.assert_allclose(step_w[6:], np.broadcast_to(np.asarray(res.log_weights), step_w[6:].shape))
    paths = res.paths()
    z = np.asarray(paths.retval[1][0])
    assert np.all(z[:, 5:] == z[:, 5:6])
    log_joint = jax.jit(jax.vmap(lambda ch: model.assess(ch, args)[0]))(paths.choices)
    np.testing.assert_allclose(log_joint, paths.score, rtol=1e-4, atol=1e-3)
    zs = np.asarray(paths["s", "z"])  # placeholders after stopping, one stored all-masked step reused
    assert np.all(zs[:, 7:] == zs[:, 6:7])
    assert np.all(np.asarray(paths.inner.args[1]) == np.arange(T))  # each step keeps its own input
    # Exact evidence of this model: the forward recursion on the first 6 observations, with
    # every particle forced to stop at step 5.
    p, mu, q = (np.asarray(a, np.float64) for a in (P, MU, STOP))
    mass = np.eye(3)[0]
    finished = 0.0
    for y in np.asarray(YS[:6], np.float64):
        joint = (mass @ p) * np.exp(-0.5 * (y - mu) ** 2) / math.sqrt(2 * math.pi)
        finished, mass = finished + joint @ q, joint * (1 - q)
    exact = math.log(finished + mass.sum())
    lz = np.array([float(run(k).log_marginal) for k in jax.random.split(jax.random.key(7), 20)])
    sd = lz.std(ddof=1)
    assert abs(lz.mean() - exact) < 5 * sd / math.sqrt(len(lz)) + sd**2 / 2 + 1e-4 * abs(exact)


def test_rejuvenation_with_finished_particles_keeps_evidence():
    check_evidence(run_seeds(16, 200, seed=3, ess_threshold=0.5, rejuvenation=inference.mh(("s", "z"))))
    # Called directly the filter checks the promise of is_finished at every step: resampled
    # particles, and moves that redraw the stop of a particle that finished at the last step.
    res = smc.particle_filter(jax.random.key(9), MODEL, ARGS, OBS, 100, ess_threshold=1.0,
                              rejuvenation=inference.mh(("s", "stop")), is_finished=is_finished)
    assert np.isfinite(float(res.log_marginal))


def test_is_finished_errors():
    with pytest.raises(ppl.ArgumentError, match="is_finished must be a function"):
        smc.particle_filter(jax.random.key(0), MODEL, ARGS, OBS, 10, is_finished=True)
    with pytest.raises(ppl.ArgumentError, match="boolean scalar"):
        smc.particle_filter(jax.random.key(0), MODEL, ARGS, OBS, 10, is_finished=lambda c: c[0])

    @ppl.gen
    def unmasked(carry, _):  # stops, but its later steps still weigh the observations
        z_prev, done = carry
        z, stop = ppl.sample("s", running, z_prev)
        return (z, done | stop), None

    with pytest.raises(ppl.ArgumentError, match="nonzero log weight increment"):
        smc.particle_filter(jax.random.key(0), ppl.scan(unmasked, length=T), ARGS, OBS, 50,
                            is_finished=is_finished)
