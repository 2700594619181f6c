"""Stochastic volatility: particle filtering and particle Gibbs on a simulated series.

The model (Kim, Shephard and Chib 1998), for t = 0..T-1:

    x_0 ~ N(mu, sigma^2 / (1 - phi^2)),   x_t = mu + phi (x_{t-1} - mu) + sigma eta_t,
    y_t ~ N(0, exp(x_t / 2)^2)            (the volatility is exp(x_t / 2)).

1. Simulate T = 500 steps at known parameters.
2. Filter them with `smc.particle_filter`: the bootstrap filter and a guided one whose
   proposal is the Gaussian from a second-order expansion of log p(y_t | x_t) at the
   prior mean (Pitt and Shephard 1999); compare their log evidence spread and ESS over
   seeds, and check the filtering band's coverage of the true volatility.
3. Plot the filtered volatility (mean and 90% band) against the true one, to
   `examples/out/stochastic_volatility.png`.
4. Particle Gibbs for (phi, sigma) with `smc.particle_gibbs` (conditional SMC with
   ancestor sampling on the states, NUTS on the parameters) and `inference.run_mcmc`;
   report the posterior against the true values.

Run `python examples/stochastic_volatility.py` (two to three minutes on a 2-core CPU)
or with `--quick` (shorter series, fewer particles and iterations).
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

import inference
import ppl
import smc

MU, PHI, SIGMA = -1.0, 0.95, 0.3  # the true parameters (mu is taken as known)
OUT = Path(__file__).resolve().parent / "out"


@ppl.gen
def sv_step(carry, t):
    """One step; the carry holds the state and the parameters, the input is t."""
    x_prev, phi, sigma = carry
    loc, scale = prior_of_step(x_prev, phi, sigma, t)
    x = ppl.sample("x", dist.Normal(loc, scale))
    ppl.sample("y", dist.Normal(0.0, jnp.exp(x / 2)))
    return (x, phi, sigma), None


def prior_of_step(x_prev, phi, sigma, t):
    """Mean and sd of x_t given x_{t-1}: the stationary law at t = 0."""
    first = t == 0
    loc = jnp.where(first, MU, MU + phi * (x_prev - MU))
    scale = jnp.where(first, sigma / jnp.sqrt(1.0 - phi**2), sigma)
    return loc, scale


@ppl.gen
def guided(carry, t, obs):
    """q(x_t | x_{t-1}, y_t): log p(y | x) = -x/2 - y^2 exp(-x)/2 + c, expanded to second
    order at the prior mean m, times the prior N(m, s^2), is Gaussian with precision
    1/s^2 + y^2 exp(-m)/2 and mean m + (y^2 exp(-m) - 1) / 2 / precision."""
    x_prev, phi, sigma = carry
    m, s = prior_of_step(x_prev, phi, sigma, t)
    e = obs["y"] ** 2 * jnp.exp(-m)
    precision = 1.0 / s**2 + e / 2
    return ppl.sample("x", dist.Normal(m + (e - 1.0) / 2 / precision, 1.0 / jnp.sqrt(precision)))


def sv_model(num_steps):
    @ppl.gen
    def model():
        phi = ppl.sample("phi", dist.Uniform(0.0, 1.0))
        sigma = ppl.sample("sigma", dist.HalfNormal(1.0))
        return ppl.sample("states", ppl.scan(sv_step, length=num_steps), (0.0, phi, sigma), jnp.arange(num_steps))

    return model


def weighted_quantiles(values, log_weights, qs):
    """[T, len(qs)] quantiles of each row of `values` [T, N] under its weights."""
    order = np.argsort(values, axis=1)
    v = np.take_along_axis(values, order, axis=1)
    w = np.take_along_axis(np.exp(log_weights - log_weights.max(1, keepdims=True)), order, axis=1)
    cdf = np.cumsum(w, axis=1) / w.sum(1, keepdims=True)
    return np.stack([v[np.arange(len(v)), np.minimum((cdf < q).sum(1), v.shape[1] - 1)] for q in qs], axis=1)


def filter_runs(model, args, obs, n, proposal, num_seeds):
    run = jax.jit(lambda key: smc.particle_filter(key, model, args, obs, n, proposal=proposal))
    res = run(jax.random.key(0))  # compile, and the run that is plotted
    t0 = time.perf_counter()
    lz = [float(run(jax.random.key(s)).log_marginal) for s in range(1, num_seeds + 1)]
    ms = (time.perf_counter() - t0) / num_seeds * 1e3
    return res, np.array(lz), ms


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="T = 200, fewer particles and MCMC iterations")
    a = p.parse_args(argv)
    num_steps, n = (200, 500) if a.quick else (500, 2000)
    num_seeds = 5 if a.quick else 20
    pg_particles, pg_warmup, pg_samples, pg_chains = (20, 100, 200, 2) if a.quick else (50, 500, 1500, 4)

    # 1. Data.
    model = ppl.scan(sv_step, length=num_steps)
    args = ((0.0, PHI, SIGMA), jnp.arange(num_steps))
    truth = model.simulate(jax.random.key(2024), args)
    x_true, ys = np.asarray(truth["x"]), truth["y"]
    print(f"simulated T = {num_steps}: mu = {MU}, phi = {PHI}, sigma = {SIGMA}; "
          f"volatility in [{np.exp(x_true.min() / 2):.2f}, {np.exp(x_true.max() / 2):.2f}]")

    # 2. Bootstrap and guided filters at the true parameters.
    obs = {"y": ys}
    results = {}
    for name, proposal in [("bootstrap", None), ("guided", guided)]:
        res, lz, ms = filter_runs(model, args, obs, n, proposal, num_seeds)
        results[name] = res
        print(f"{name:9s} filter, N = {n}: log Z {lz.mean():.2f} (sd {lz.std(ddof=1):.3f} over {num_seeds} "
              f"seeds), mean ESS {float(res.ess.mean()):.0f}, {ms:.1f} ms per run")

    # 3. Filtered volatility: mean and 90% band of exp(x_t / 2) given y_0..t.
    res = results["guided"]
    xs = np.asarray(res.step_particles["x"], np.float64)  # [T, N]
    log_w = np.asarray(res.step_log_weights, np.float64)
    vol = np.exp(xs / 2)
    mean = (np.exp(log_w) * vol).sum(1)
    lo, hi = np.exp(weighted_quantiles(xs, log_w, [0.05, 0.95]) / 2).T
    true_vol = np.exp(x_true / 2)
    coverage = float(np.mean((lo <= true_vol) & (true_vol <= hi)))
    print(f"the 90% filtering band covers the true volatility at {100 * coverage:.0f}% of the steps")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    OUT.mkdir(exist_ok=True)
    fig, (ax_y, ax_v) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    ax_y.plot(np.asarray(ys), lw=0.7, color="0.3")
    ax_y.set_ylabel("y (returns)")
    ax_v.fill_between(np.arange(num_steps), lo, hi, color="C0", alpha=0.3, label="90% filtering band")
    ax_v.plot(mean, color="C0", lw=1.2, label="filtered mean")
    ax_v.plot(true_vol, color="k", lw=0.9, ls="--", label="true volatility")
    ax_v.set_ylabel("exp(x / 2)")
    ax_v.set_xlabel("t")
    ax_v.legend(loc="upper right")
    fig.suptitle(f"Stochastic volatility, guided particle filter, N = {n}")
    fig.tight_layout()
    path = OUT / "stochastic_volatility.png"
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")

    # 4. Particle Gibbs for (phi, sigma): CSMC with ancestor sampling on the states, NUTS on
    # the parameters given the states.
    kernel = smc.particle_gibbs("states", inference.nuts(), pg_particles, ancestor_sampling=True)
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # a short run may trip the r_hat warning: r_hat is printed below
        warnings.simplefilter("ignore", inference.ConvergenceWarning)
        samples = inference.run_mcmc(jax.random.key(7), kernel, sv_model(num_steps), (), {"states": {"y": ys}},
                                     num_warmup=pg_warmup, num_samples=pg_samples, num_chains=pg_chains,
                                     progress_bar=False)
    seconds = time.perf_counter() - t0
    print(f"particle Gibbs: {pg_chains} chains x ({pg_warmup} warmup + {pg_samples} draws), "
          f"{pg_particles} particles, {seconds:.0f} s")
    summary = samples.summary()
    for name, true in [("phi", PHI), ("sigma", SIGMA)]:
        row = summary[name]
        print(f"  {name:5s} posterior mean {float(row['mean']):.3f} sd {float(row['sd']):.3f}, 90% interval "
              f"[{float(row['5%']):.3f}, {float(row['95%']):.3f}], n_eff {float(row['n_eff']):.0f}, "
              f"r_hat {float(row['r_hat']):.3f}   true {true}")
    # One series informs (phi, sigma) only so far: compare the likelihood, by the filter, at
    # the truth and at the posterior mean.
    log_lik = jax.jit(lambda key, phi, sigma: smc.particle_filter(
        key, model, ((0.0, phi, sigma), jnp.arange(num_steps)), obs, n).log_marginal)
    for label, phi, sigma in [("true", PHI, SIGMA),
                              ("posterior mean", float(summary["phi"]["mean"]), float(summary["sigma"]["mean"]))]:
        lz = np.mean([float(log_lik(jax.random.key(s), phi, sigma)) for s in range(num_seeds)])
        print(f"  log p(y | phi, sigma) at the {label} (phi, sigma) = ({phi:.3f}, {sigma:.3f}): {lz:.2f}")
    return 0


if __name__ == "__main__":
    main()
