"""SMC benchmark: the bootstrap particle filter against the same filter hand-coded in plain JAX.

Run `python benchmarks/smc.py` (N = 1,000, 10,000, 100,000) or `python benchmarks/smc.py
--quick` (N = 1,000 only, few repeats).

Model and data: the linear-Gaussian state-space model of the shared benchmark data
`benchmarks/data/lgssm_T100.npz` (see data/README.md): x_0 ~ N(0, sx^2 / (1 - phi^2)),
x_t = phi x_{t-1} + N(0, sx^2), y_t = x_t + N(0, sy^2), phi = 0.9, sx = 1, sy = 0.5, T = 100,
every y_t observed (y_0 included). The file's `y` is used as is (float32); its exact
(Kalman) log likelihood is -153.12478, recomputed here in float64. (`_common.make_lgss_data`
simulates a different series, from x_0 = 0, so it is not used.) In the framework the model is
`ppl.scan(step)` of a kernel `step(x_prev, scale)` sampling "x" ~ Normal(phi x_prev, scale)
and "y" ~ Normal(x, sy), called with args `(0.0, scales)`, scales[0] = sx / sqrt(1 - phi^2)
(the stationary start) and scales[t] = sx after, constrained with `{"y": y}`.

Every implementation is a bootstrap filter with N particles and systematic resampling
before every step t >= 1 (`ess_threshold=1.0`), and returns the log evidence estimate.
`batch` is N. Implementations (`impl`):

  `framework_direct`   `smc.particle_filter(...)` called as is: its Python-side checks, the
                       jitted run, the host read of its status flag, and the full result
                       (log weights, ESS [T], ancestors [T, N], the step traces [T, N] that
                       `paths()` needs).
  `framework_jit`      `jax.jit(lambda k: smc.particle_filter(...).log_marginal)`: XLA prunes
                       the stored history. Same key, so the same particles as framework_direct.
  `handcoded_batched`  plain JAX: one `lax.scan` over steps, `normal(k_t, (N,))` per step,
                       `jax.scipy.stats.norm.logpdf`, systematic resampling by `searchsorted`
                       on the weight CDF and a gather; returns (log Z, final log weights,
                       final particles). The lower bound a user could reach; the target is
                       framework_jit <= 1.25x this.
  `handcoded_keys`     the same, with per-particle keys: particle slot i draws
                       `normal(fold_in(keys[i], t))`, keys = split(key, N) (as `vmap` over a
                       per-particle function would).
  `particles`          the `particles` library (Chopin's, NumPy; `pip install particles`, in
                       the `bench` extra): `particles.SMC` on `ssm.Bootstrap` of the same model
                       (PX0 the stationary normal, PX, PY), systematic resampling with
                       `ESSrmin=1.0` (every step t >= 1), no history or moments collected, the
                       data in float64; seeded with `np.random.seed`. Left out, with a note,
                       when the library is not installed. Rows get `ratio_vs_particles`.

Tempered SMC (`--case tempered`, also part of the default run): Bayesian logistic
regression on `benchmarks/data/logreg_5000x20.npz` (alpha ~ N(0, 1), beta_j ~ N(0, 1),
y_i ~ Bernoulli(logit = alpha + X_i . beta), 21 parameters, 5000 points), adaptive
tempering from the prior with target ESS N/2 and systematic resampling, N = 200 particles,
HMC with 10 leapfrog steps, diagonal inverse mass matrix from the particles' variance and
step size from the acceptance rate. Implementations:

  `framework`            `smc.tempered(..., kernel=inference.hmc(num_steps=10),
                         num_mcmc_steps=5)` under `jax.jit` (log Z and the particles).
  `framework_waste_free` the same with `waste_free=20` (20 chains of length 10).
  `blackjax`             `blackjax.inner_kernel_tuning` around
                         `blackjax.adaptive_tempered_smc` with `blackjax.hmc` (10 leapfrog
                         steps, 5 MCMC steps per temperature), its inverse mass matrix the
                         particles' variance after each step (blackjax's
                         `inverse_mass_matrix_from_particles`) and the same step-size rule,
                         the temperature loop a `lax.while_loop` in one jit.

There is no closed-form evidence; rows report the mean and sd of log Z over seeds, the number
of temperatures, and `posterior_mean_max_diff_sd`: the largest difference of a posterior mean
from blackjax's, over the 21 parameters, in posterior sds (pooled over seeds). Run time is the
median over the seeds' runs (interleaved across implementations) after the compile
(compile_ms: the first call, trace and compile included).

Output: one JSON object per line (the schema of `core.py`, see `_common.row`):
run_ms_median / run_ms_iqr over interleaved repeats after warm-up, compile_ms (first call of
a fresh jit after `jax.clear_caches()`), ratio_vs_handcoded (vs `handcoded_batched`, the
target's reference), ratio_vs_lower_bound (the same), plus `ratio_vs_handcoded_keys`,
`log_marginal` (the mean over 100 seeds), `log_marginal_sd` (their sd), `log_marginal_exact`,
and `ratio_vs_particles` (vs the `particles` library's median, when it is installed).
Before timing the script checks every implementation's 20-seed mean against the Kalman
value: |mean - exact| < 5 sd / sqrt(20) + sd^2 / 2 (the -Var/2 bias of log Z-hat), and
exits with status 1 otherwise.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.scipy.special import logsumexp
from jax.scipy.stats import norm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
import _common  # noqa: E402
from _common import first_call_ms, log, time_interleaved  # noqa: E402

import inference  # noqa: E402
import ppl  # noqa: E402
import smc  # noqa: E402

DATA = str(Path(__file__).resolve().parent / "data" / "lgssm_T100.npz")
LOGREG = str(Path(__file__).resolve().parent / "data" / "logreg_5000x20.npz")
NUM_SEEDS = 100  # an sd from 100 seeds is within about 14% of the true one (95%)


def load():
    d = np.load(DATA)
    phi, sx, sy = float(d["phi"]), float(d["sx"]), float(d["sy"])
    return jnp.asarray(d["y"], jnp.float32), phi, sx, sy


def kalman_log_likelihood(ys, phi, sx, sy):
    """Exact log p(ys), float64, stationary start."""
    m, p, ll = 0.0, sx**2 / (1 - phi**2), 0.0
    for t, y in enumerate(np.asarray(ys, np.float64)):
        if t > 0:
            m, p = phi * m, phi**2 * p + sx**2
        s = p + sy**2
        ll += -0.5 * (math.log(2 * math.pi * s) + (y - m) ** 2 / s)
        gain = p / s
        m, p = m + gain * (y - m), (1 - gain) * p
    return ll


def scales(num_steps, phi, sx):
    return jnp.full((num_steps,), sx, jnp.float32).at[0].set(sx / math.sqrt(1 - phi**2))


def framework_model(phi, sy):
    @ppl.gen
    def step(x_prev, scale):
        x = ppl.sample("x", dist.Normal(phi * x_prev, scale))
        ppl.sample("y", dist.Normal(x, sy))
        return x, None

    return ppl.scan(step)


def systematic(key, log_w, n):
    """Hand-coded systematic resampling, the same algorithm as smc.systematic: point k
    takes the number of particles whose first point is at or before k (a histogram and a
    cumulative sum, O(N); `jnp.searchsorted` of the n points is O(n log N) and ~3x slower
    on CPU at N = 100,000)."""
    w = jnp.exp(log_w - logsumexp(log_w))
    cdf = jnp.cumsum(w)
    first = jnp.clip(jnp.ceil(n * cdf / cdf[-1] - jax.random.uniform(key, ())), 0, n).astype(jnp.int32)
    return jnp.clip(jnp.cumsum(jnp.zeros(n + 1, jnp.int32).at[first].add(1)[:n]), 0, n - 1)


def handcoded(key, ys, sc, phi, sy, n, per_particle_keys):
    """Bootstrap PF, resampling before every step t >= 1. Returns (log Z, log weights, x)."""
    k_draw, k_res = jax.random.split(key)
    keys = jax.random.split(k_draw, n) if per_particle_keys else None

    def body(state, inp):
        x, log_w, log_z = state
        t, y, scale = inp
        a = jax.lax.cond(t > 0, lambda: systematic(jax.random.fold_in(k_res, t), log_w, n),
                         lambda: jnp.arange(n))
        x, log_w = x[a], jnp.where(t > 0, -math.log(n), log_w)
        if per_particle_keys:
            eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, t)))(keys)
        else:
            eps = jax.random.normal(jax.random.fold_in(k_draw, t), (n,))
        x = phi * x + scale * eps
        log_w = log_w + norm.logpdf(y, x, sy)
        lz = logsumexp(log_w)
        return (x, log_w - lz, log_z + lz), None

    init = (jnp.zeros((n,)), jnp.full((n,), -math.log(n)), jnp.zeros(()))
    (x, log_w, log_z), _ = jax.lax.scan(body, init, (jnp.arange(len(ys)), ys, sc))
    return log_z, log_w, x


def particles_peer(ys, phi, sx, sy, n):
    """The bootstrap filter of the `particles` library: key -> log Z (seeded from the key)."""
    import particles
    from particles import distributions as dists
    from particles import state_space_models as ssm

    class LinearGaussian(ssm.StateSpaceModel):
        def PX0(self):
            return dists.Normal(loc=0.0, scale=sx / math.sqrt(1 - phi**2))

        def PX(self, t, xp):
            return dists.Normal(loc=phi * xp, scale=sx)

        def PY(self, t, xp, x):
            return dists.Normal(loc=x, scale=sy)

    data = np.asarray(ys, np.float64)

    def run(key):
        np.random.seed(int(np.asarray(jax.random.key_data(key))[-1]))
        alg = particles.SMC(fk=ssm.Bootstrap(ssm=LinearGaussian(), data=data), N=n, resampling="systematic",
                            ESSrmin=1.0, store_history=False, collect=None)
        alg.run()
        return np.float64(alg.logLt)

    return run


def has_particles():
    try:
        import particles  # noqa: F401
    except ImportError:
        return False
    return True


def makers(ys, sc, phi, sy, n, sx=1.0):
    model = framework_model(phi, sy)
    run = lambda k: smc.particle_filter(k, model, (0.0, sc), {"y": ys}, n,  # noqa: E731
                                        resampling="systematic", ess_threshold=1.0)
    out = {
        "framework_direct": lambda: run,
        "framework_jit": lambda: jax.jit(lambda k: run(k).log_marginal),
        "handcoded_batched": lambda: jax.jit(lambda k: handcoded(k, ys, sc, phi, sy, n, False)),
        "handcoded_keys": lambda: jax.jit(lambda k: handcoded(k, ys, sc, phi, sy, n, True)),
    }
    if has_particles():
        out["particles"] = lambda: particles_peer(ys, phi, sx, sy, n)
    return out


def log_marginal_of(out):
    if isinstance(out, smc.ParticleFilterResult):
        return out.log_marginal
    return out[0] if isinstance(out, tuple) else out


def bench(ys, sc, phi, sy, n, exact, repeats, warmup, sx=1.0):
    label = f"smc_bootstrap T={len(ys)} N={n}"
    fns, compile_ms = {}, {}
    for name, make in makers(ys, sc, phi, sy, n, sx).items():
        log(f"{label}: compiling {name}")
        fns[name], _, compile_ms[name] = first_call_ms(make, (jax.random.key(0),))
    stats = {}
    for name, fn in fns.items():
        lz = np.array([float(log_marginal_of(fn(jax.random.key(s)))) for s in range(NUM_SEEDS)])
        mean, sd = lz.mean(), lz.std(ddof=1)
        stats[name] = (mean, sd)
        tol = 5 * sd / math.sqrt(NUM_SEEDS) + sd**2 / 2 + 1e-4 * abs(exact)
        log(f"{label}: {name} log Z mean {mean:.4f} sd {sd:.4f} (exact {exact:.4f}, tolerance {tol:.4f})")
        if not abs(mean - exact) < tol:
            sys.exit(f"benchmarks/smc.py: FAILED CHECK: {label}: {name} log Z mean {mean:.4f} over "
                     f"{NUM_SEEDS} seeds, exact {exact:.4f}, tolerance {tol:.4f}.")
    log(f"{label}: timing {repeats} x {len(fns)} (interleaved)")
    samples = time_interleaved(fns, (jax.random.key(0),), repeats, warmup)
    ref = float(np.median(samples["handcoded_batched"]))
    keys_ms = float(np.median(samples["handcoded_keys"]))
    if "particles" in samples:
        peer_ms = float(np.median(samples["particles"]))
        peer = lambda name: {"ratio_vs_particles": round(float(np.median(samples[name])) / peer_ms, 3)}  # noqa: E731
    else:
        peer = lambda name: {}  # noqa: E731
    for name in fns:
        mean, sd = stats[name]
        _common.emit("smc_bootstrap", name, n, samples[name], compile_ms[name], ref, ref, **peer(name),
                     ratio_vs_handcoded_keys=round(float(np.median(samples[name])) / keys_ms, 3),
                     log_marginal=round(mean, 4), log_marginal_sd=round(sd, 4),
                     log_marginal_exact=round(exact, 4), num_steps=len(ys))


# -- tempered SMC on the logistic regression ---------------------------------------------------
TEMPERED_N, TEMPERED_LEAPFROG, TEMPERED_MCMC_STEPS, TEMPERED_SEEDS = 200, 10, 5, 5


@ppl.gen
def logreg(x):
    alpha = ppl.sample("alpha", dist.Normal(0.0, 1.0))
    beta = ppl.sample("beta", dist.Normal(jnp.zeros(x.shape[1]), 1.0))
    return ppl.sample("y", dist.Bernoulli(logits=alpha + x @ beta))


def tempered_framework(x, y, waste_free):
    options = {"waste_free": 20} if waste_free else {"num_mcmc_steps": TEMPERED_MCMC_STEPS}

    def run(key):
        res = smc.tempered(key, logreg, (x,), {"y": y}, TEMPERED_N,
                           kernel=inference.hmc(num_steps=TEMPERED_LEAPFROG), **options)
        position = jnp.concatenate([res["alpha"][:, None], res["beta"]], axis=1)
        return res.log_marginal, position, res.num_steps

    return jax.jit(run)


def tempered_blackjax(x, y):
    import blackjax
    from blackjax.smc import resampling
    from blackjax.smc.tuning.from_particles import particles_as_rows

    dim = x.shape[1] + 1

    def log_prior(p):
        return jnp.sum(norm.logpdf(p))

    def log_likelihood(p):
        logits = p[0] + x @ p[1:]
        return jnp.sum(y * logits - jnp.logaddexp(0.0, logits))

    def update_parameters(key, state, info):
        # The mass matrix from the particles; the step size is set in `body` (same rule as
        # the framework: log eps += mean acceptance - 0.65, at most 1.5).
        return dict(step_size=jnp.ones((1,)), num_integration_steps=jnp.array([TEMPERED_LEAPFROG]),
                    inverse_mass_matrix=jnp.var(particles_as_rows(state.particles), axis=0)[None])

    def algorithm(params):
        return blackjax.inner_kernel_tuning(
            smc_algorithm=blackjax.adaptive_tempered_smc, logprior_fn=log_prior, loglikelihood_fn=log_likelihood,
            mcmc_step_fn=blackjax.hmc.build_kernel(), mcmc_init_fn=blackjax.hmc.init,
            resampling_fn=resampling.systematic, mcmc_parameter_update_fn=update_parameters,
            initial_parameter_value=params, num_mcmc_steps=TEMPERED_MCMC_STEPS, target_ess=0.5)

    def run(key):
        k_init, k_loop = jax.random.split(key)
        particles = jax.random.normal(k_init, (TEMPERED_N, dim))
        eps0 = jnp.asarray(dim ** -0.25, jnp.float32)

        def body(carry):
            state, log_z, eps, k = carry
            new, info = algorithm(state.parameter_override).step(jax.random.fold_in(k_loop, k), state)
            eps = jnp.minimum(eps * jnp.exp(jnp.mean(info.update_info.acceptance_rate) - 0.65), 1.5)
            new = new._replace(parameter_override=dict(new.parameter_override, step_size=eps[None]))
            return new, log_z + info.log_likelihood_increment, eps, k + 1

        params = dict(step_size=eps0[None], num_integration_steps=jnp.array([TEMPERED_LEAPFROG]),
                      inverse_mass_matrix=jnp.ones((1, dim)))
        state0 = algorithm(params).init(particles)
        state, log_z, _, k = jax.lax.while_loop(
            lambda c: c[0].sampler_state.tempering_param < 1.0, body,
            (state0, jnp.zeros(()), eps0, jnp.zeros((), jnp.int32)))
        return log_z, state.sampler_state.particles, k

    return jax.jit(run)


def bench_tempered():
    d = np.load(LOGREG)
    x, y = jnp.asarray(d["X"], jnp.float32), jnp.asarray(d["y"], jnp.float32)
    makers_ = {"framework": lambda: tempered_framework(x, y, False),
               "framework_waste_free": lambda: tempered_framework(x, y, True)}
    try:
        import blackjax  # noqa: F401

        makers_["blackjax"] = lambda: tempered_blackjax(x, y)
    except ImportError:
        log("blackjax not installed: tempered SMC without the peer")
    label = f"smc_tempered logreg N={TEMPERED_N}"
    fns, compile_ms, runs, times = {}, {}, {name: [] for name in makers_}, {name: [] for name in makers_}
    for name, make in makers_.items():
        log(f"{label}: compiling {name}")
        fns[name], _, compile_ms[name] = first_call_ms(make, (jax.random.key(100),))
    for s in range(TEMPERED_SEEDS):  # interleaved, so that other load on the machine hits all alike
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn(jax.random.key(s)))
            times[name].append((time.perf_counter() - t0) * 1e3)
            runs[name].append([np.asarray(v, np.float64) for v in out])
    results = {}
    for name in fns:
        lz = np.array([r[0] for r in runs[name]])
        positions = np.stack([r[1] for r in runs[name]])  # [S, N, 21]
        steps = np.array([r[2] for r in runs[name]])
        results[name] = (times[name], compile_ms[name], lz, positions, steps)
        log(f"{label}: {name} log Z {lz.mean():.3f} sd {lz.std(ddof=1):.3f}, {steps.mean():.1f} temperatures, "
            f"{np.median(times[name]):.0f} ms")
    ref_name = "blackjax" if "blackjax" in results else "framework"
    ref_times, _, _, ref_pos, _ = results[ref_name]
    ref_mean, ref_sd = ref_pos.reshape(-1, ref_pos.shape[-1]).mean(0), ref_pos.reshape(-1, ref_pos.shape[-1]).std(0)
    for name, (times, compile_ms, lz, positions, steps) in results.items():
        mean = positions.reshape(-1, positions.shape[-1]).mean(0)
        _common.emit("smc_tempered_logreg", name, TEMPERED_N, times, compile_ms, float(np.median(ref_times)),
                     log_marginal=round(float(lz.mean()), 3), log_marginal_sd=round(float(lz.std(ddof=1)), 3),
                     num_temperatures=round(float(steps.mean()), 1), seeds=TEMPERED_SEEDS,
                     posterior_mean_max_diff_sd=round(float(np.max(np.abs(mean - ref_mean) / ref_sd)), 3),
                     reference=ref_name)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="N = 1,000 only, few repeats")
    p.add_argument("--system-malloc", action="store_true",
                   help="leave glibc's malloc at its defaults (see _common.keep_freed_memory)")
    p.add_argument("--case", choices=("all", "bootstrap", "tempered"), default="all",
                   help="the bootstrap particle filter, tempered SMC on the logistic regression, or both")
    a = p.parse_args(argv)
    if not a.system_malloc and not _common.keep_freed_memory():
        log("note: could not set glibc malloc options; timings include page faults")
    if a.case == "tempered":
        return bench_tempered()
    ys, phi, sx, sy = load()
    sc = scales(len(ys), phi, sx)
    exact = kalman_log_likelihood(ys, phi, sx, sy)
    if abs(exact - (-153.12478)) > 1e-3:
        sys.exit(f"benchmarks/smc.py: FAILED CHECK: Kalman log likelihood {exact:.5f}, "
                 "README says -153.12478.")
    # One-time process costs (lazy imports, small helper jits) before any compile timing.
    if not has_particles():
        log("the particles library is not installed (pip install particles): no `particles` rows")
    for make in makers(ys[:3], sc[:3], phi, sy, 2, sx).values():
        jax.block_until_ready(log_marginal_of(make()(jax.random.key(0))))
    if a.quick:
        bench(ys, sc, phi, sy, 1_000, exact, repeats=10, warmup=2, sx=sx)
    else:
        bench(ys, sc, phi, sy, 1_000, exact, repeats=50, warmup=3, sx=sx)
        bench(ys, sc, phi, sy, 10_000, exact, repeats=30, warmup=3, sx=sx)
        bench(ys, sc, phi, sy, 100_000, exact, repeats=15, warmup=2, sx=sx)
    if a.case == "all":
        bench_tempered()


if __name__ == "__main__":
    main()
