"""MCMC benchmark: NUTS, 4 chains, on eight schools (non-centered) and Bayesian logistic
regression (5,000 x 20), this project vs NumPyro's NUTS and BlackJAX's window adaptation +
NUTS, in one run.

    python benchmarks/mcmc.py [--quick] [--devices 4]

`--devices 4` forces 4 CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=4`,
set before JAX starts): the framework then splits its chains over the devices and NumPyro
runs `chain_method="parallel"`; without it both run the chains vmapped on one device.
BlackJAX always vmaps its chains. `--quick`: 200 warmup + 200 draws.

Implementations (same data, same model, same priors):
  framework   `inference.run_nuts(key, model, args, {"y": y}, ...)`
  numpyro     `MCMC(NUTS(model), ..., chain_method="vectorized" | "parallel", jit_model_args=True)`
  blackjax    `blackjax.window_adaptation(blackjax.nuts, logdensity)` per chain, then
              `blackjax.nuts` steps in a `lax.scan`, chains vmapped, all in one `jax.jit`;
              the log density written by hand on (mu, log tau, theta_trans) / (alpha, beta)

Output: one JSON line per (benchmark, impl) with
  first_call_s   wall time of the first call (trace + compile + warmup + sampling)
  run_s          median wall time of 10 repeat calls with the same shapes, new keys and
                 new data values, the impls taking turns (round-robin); NumPyro recompiles
                 inside each `run()`
  compile_s      first_call_s - run_s
  min_bulk_ess   minimum over every scalar parameter of the bulk ESS (numpyro.diagnostics),
                 the mean over the repeat calls (one seed's minimum varies by ~20%), and
                 min_bulk_ess_se its standard error (sd over the repeats / sqrt(repeats))
  ess_per_s      min_bulk_ess / run_s; ratio_ess_per_s_vs_best_peer: this over the best of
                 the NumPyro and BlackJAX rows of the same benchmark
  means          posterior means of two parameters, to see that the impls agree
Before printing, every impl's means must agree with the framework's within 5 Monte Carlo
standard errors (sd / sqrt(ESS), both impls' errors combined), else exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys

if "--devices" in sys.argv:  # must precede the first `import jax`
    n = sys.argv[sys.argv.index("--devices") + 1]
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"

import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from numpyro.diagnostics import effective_sample_size  # noqa: E402
from numpyro.infer import MCMC, NUTS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo, before benchmarks/
import inference  # noqa: E402
import ppl  # noqa: E402

sys.path.insert(1, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

try:
    import blackjax
except ImportError:  # the `bench` extra
    blackjax = None

CHAINS = 4
Y8 = jnp.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SIGMA8 = jnp.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
LOGREG = Path(__file__).resolve().parent / "data" / "logreg_5000x20.npz"


# -- models ----------------------------------------------------------------------------------
@ppl.gen
def eight_schools(sigma):
    mu = ppl.sample("mu", dist.Normal(0.0, 5.0))
    tau = ppl.sample("tau", dist.HalfCauchy(5.0))
    theta_trans = ppl.sample("theta_trans", dist.Normal(jnp.zeros(8), 1.0))
    return ppl.sample("y", dist.Normal(mu + tau * theta_trans, sigma))


def eight_schools_numpyro(sigma, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    theta_trans = numpyro.sample("theta_trans", dist.Normal(jnp.zeros(8), 1.0))
    numpyro.sample("y", dist.Normal(mu + tau * theta_trans, sigma), obs=y)


def eight_schools_logdensity(y, sigma):
    def logdensity(p):
        tau = jnp.exp(p["log_tau"])
        return (dist.Normal(0.0, 5.0).log_prob(p["mu"]) + dist.HalfCauchy(5.0).log_prob(tau) + p["log_tau"]
                + dist.Normal(0.0, 1.0).log_prob(p["theta_trans"]).sum()
                + dist.Normal(p["mu"] + tau * p["theta_trans"], sigma).log_prob(y).sum())

    return logdensity


@ppl.gen
def logreg(x):
    alpha = ppl.sample("alpha", dist.Normal(0.0, 1.0))
    beta = ppl.sample("beta", dist.Normal(jnp.zeros(x.shape[1]), 1.0))
    return ppl.sample("y", dist.Bernoulli(logits=alpha + x @ beta))


def logreg_numpyro(x, y=None):
    alpha = numpyro.sample("alpha", dist.Normal(0.0, 1.0))
    beta = numpyro.sample("beta", dist.Normal(jnp.zeros(x.shape[1]), 1.0))
    numpyro.sample("y", dist.Bernoulli(logits=alpha + x @ beta), obs=y)


def logreg_logdensity(y, x):
    def logdensity(p):
        logits = p["alpha"] + x @ p["beta"]
        return (dist.Normal(0.0, 1.0).log_prob(p["alpha"]) + dist.Normal(0.0, 1.0).log_prob(p["beta"]).sum()
                + jnp.sum(y * logits - jnp.logaddexp(0.0, logits)))

    return logdensity


# -- runners: each returns {name: [chains, draws, ...]} (constrained values) -------------------
def run_framework(model, args, y, key, warmup, draws):
    s = inference.run_nuts(key, model, args, {"y": y}, num_warmup=warmup, num_samples=draws,
                           num_chains=CHAINS, progress_bar=False)
    return {name: np.asarray(s[name]) for name in s.keys()}


def run_numpyro(model, args, y, key, warmup, draws, method):
    mcmc = MCMC(NUTS(model), num_warmup=warmup, num_samples=draws, num_chains=CHAINS, chain_method=method,
                progress_bar=False, jit_model_args=True)
    mcmc.run(key, *args, y=y)
    return {k: np.asarray(v) for k, v in mcmc.get_samples(group_by_chain=True).items()}


_BLACKJAX: dict = {}


def run_blackjax(logdensity_of, init, y, args, key, warmup, draws, to_constrained):
    signature = (logdensity_of, warmup, draws)
    if signature not in _BLACKJAX:
        @jax.jit
        def run(key, y, args):
            logdensity = logdensity_of(y, *args)

            def chain(key):
                k_init, k_warm, k_draw = jax.random.split(key, 3)
                position = jax.tree.map(lambda x: jax.random.uniform(k_init, jnp.shape(x), minval=-2, maxval=2), init)
                adapt = blackjax.window_adaptation(blackjax.nuts, logdensity)
                (state, params), _ = adapt.run(k_warm, position, num_steps=warmup)
                kernel = blackjax.nuts(logdensity, **params)

                def step(state, k):
                    state, _ = kernel.step(k, state)
                    return state, state.position

                return jax.lax.scan(step, state, jax.random.split(k_draw, draws))[1]

            return jax.vmap(chain)(jax.random.split(key, CHAINS))

        _BLACKJAX[signature] = run
    return {k: np.asarray(v) for k, v in to_constrained(_BLACKJAX[signature](key, y, args)).items()}


# -- measuring -------------------------------------------------------------------------------
def min_bulk_ess(samples):
    ess = [effective_sample_size(v.reshape(v.shape[:2] + (-1,))[..., i:i + 1].squeeze(-1))
           for v in samples.values() for i in range(int(np.prod(v.shape[2:], dtype=int)))]
    return float(min(ess))


def mean_and_se(samples, name, index=None):
    v = samples[name] if index is None else samples[name][..., index]
    return float(v.mean()), float(v.std() / math.sqrt(effective_sample_size(v)))


def measure(runs, data_variants, repeats=10):
    """Each impl's first call, then `repeats` rounds in which every impl runs once with
    new keys and data values, round-robin, so that a slow spell of the machine falls on
    all impls alike. {impl: (first_s, run_s, mean and s.e. over the repeats of the min bulk ESS,
    last samples)}."""
    first, times, ess, samples = {}, {}, {}, {}
    for impl, run in runs.items():
        _common.log(f"first call: {impl}")
        t0 = time.perf_counter()
        samples[impl] = run(jax.random.key(0), data_variants[0])
        first[impl] = time.perf_counter() - t0
    for r in range(repeats):
        for impl, run in runs.items():
            t0 = time.perf_counter()
            samples[impl] = run(jax.random.key(r + 1), data_variants[(r + 1) % len(data_variants)])
            times.setdefault(impl, []).append(time.perf_counter() - t0)
            ess.setdefault(impl, []).append(min_bulk_ess(samples[impl]))
    return {impl: (first[impl], float(np.median(times[impl])),
                   (float(np.mean(ess[impl])), float(np.std(ess[impl], ddof=1) / math.sqrt(repeats))), samples[impl])
            for impl in runs}


def bench(name, impls, data_variants, checks, warmup, draws):
    rows, means = [], {}
    _common.log(name)
    for impl, (first, run_s, ess, samples) in measure(impls, data_variants).items():
        means[impl] = {label: mean_and_se(samples, *spec) for label, spec in checks.items()}
        rows.append(dict(benchmark=name, impl=impl, chains=CHAINS, warmup=warmup, draws=draws,
                         first_call_s=round(first, 3), run_s=round(run_s, 3), compile_s=round(first - run_s, 3),
                         min_bulk_ess=round(ess[0], 1), min_bulk_ess_se=round(ess[1], 1),
                         ess_per_s=round(ess[0] / run_s, 1),
                         means={k: round(v[0], 4) for k, v in means[impl].items()}))
    # the last data variant is the one every impl finished on: compare means there
    for impl in means:
        for label, (m, se) in means[impl].items():
            m0, se0 = means["framework"][label]
            if abs(m - m0) > 5 * math.hypot(se, se0):
                sys.exit(f"benchmarks/mcmc.py: {name}: {impl} gives {label} = {m:.4f}, the framework "
                         f"{m0:.4f} (5 combined s.e. = {5 * math.hypot(se, se0):.4f}).")
    peers = [r["ess_per_s"] for r in rows if r["impl"] != "framework"]
    for r in rows:
        r["ratio_ess_per_s_vs_best_peer"] = round(r["ess_per_s"] / max(peers), 3) if peers else None
        r.update(jax=jax.__version__, numpyro=numpyro.__version__,
                 blackjax=getattr(blackjax, "__version__", None), devices=jax.device_count(),
                 device=jax.devices()[0].device_kind)
        print(json.dumps(r), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="200 warmup + 200 draws")
    p.add_argument("--devices", type=int, default=1, help="force this many CPU devices (set before JAX starts)")
    a = p.parse_args(argv)
    _common.keep_freed_memory()
    warmup = draws = 200 if a.quick else 1000
    method = "parallel" if jax.device_count() > 1 else "vectorized"

    # eight schools; the repeat calls see y shifted by 1 (same shapes, new values)
    variants = [Y8, Y8 + 1.0]
    init8 = {"mu": jnp.zeros(()), "log_tau": jnp.zeros(()), "theta_trans": jnp.zeros(8)}

    def constrain8(p):
        return {"mu": p["mu"], "tau": jnp.exp(p["log_tau"]), "theta_trans": p["theta_trans"]}

    impls = {
        "framework": lambda k, y: run_framework(eight_schools, (SIGMA8,), y, k, warmup, draws),
        f"numpyro_{method}": lambda k, y: run_numpyro(eight_schools_numpyro, (SIGMA8,), y, k, warmup, draws, method),
    }
    if blackjax is not None:
        impls["blackjax"] = lambda k, y: run_blackjax(eight_schools_logdensity, init8, y, (SIGMA8,), k, warmup,
                                                      draws, constrain8)
    bench("eight_schools", impls, variants, {"mu": ("mu",), "tau": ("tau",)}, warmup, draws)

    data = np.load(LOGREG)
    x, y = jnp.asarray(data["X"]), jnp.asarray(data["y"], jnp.float32)
    variants = [y, 1.0 - y]
    initlr = {"alpha": jnp.zeros(()), "beta": jnp.zeros(x.shape[1])}
    impls = {
        "framework": lambda k, y: run_framework(logreg, (x,), y, k, warmup, draws),
        f"numpyro_{method}": lambda k, y: run_numpyro(logreg_numpyro, (x,), y, k, warmup, draws, method),
    }
    if blackjax is not None:
        impls["blackjax"] = lambda k, y: run_blackjax(logreg_logdensity, initlr, y, (x,), k, warmup, draws,
                                                      lambda p: p)
    bench("logreg", impls, variants, {"alpha": ("alpha",), "beta_0": ("beta", 0)}, warmup, draws)


if __name__ == "__main__":
    main()
