"""Core benchmarks: the framework against the same computation hand-coded in plain JAX and NumPyro.

Run `python benchmarks/core.py` (full size) or `python benchmarks/core.py --quick` (smoke
run, small sizes). Model: Bayesian linear regression on 100 points,
slope ~ Normal(0, 1), noise ~ HalfNormal(1), ys ~ Normal(slope * xs, noise), with
xs = linspace(-2, 2, 100) and ys = 0.7 xs + 0.5 * normal noise from a fixed key.

Benchmarks (`benchmark` field) and implementations (`impl` field):

- `importance`: prior-proposal importance sampling, `batch` = 100,000 particles; returns
  the log marginal likelihood, the log weights and the slope/noise samples.
  `framework_direct` calls `inference.importance(...)` (it jits internally; the timed call
  includes its Python-side checks, the host copy of the weights it inspects, and the full
  traces with per-site scores); `framework_jit` is
  `jax.jit(lambda k: inference.importance(...).log_marginal)` (XLA prunes the traces);
  `handcoded_keys` is the same computation in plain JAX: `vmap` over one split key per
  particle, one `fold_in` key per site (the framework's own scheme, so the particles are
  the same draws), `jax.scipy.stats` densities; `handcoded_batched` draws
  `normal(k, (N,))` per site, the lower bound a user could reach. `numpyro` is the
  idiomatic NumPyro route on the same model written with `numpyro.sample` (`obs=ys`):
  `Predictive(model, num_samples=N, return_sites=["slope", "noise"], parallel=True)(k, xs)`
  for the prior draws, `log_likelihood(model, prior, xs, ys, parallel=True)["ys"]` summed
  over points for the log weights, then logsumexp - log N, all in one `jax.jit`. NumPyro's
  default settings (validation on, so every `log_prob` carries the support mask), except
  `parallel=True`: the default `parallel=False` runs a sequential `lax.map` over the N
  particles, which nobody would use at this size. `numpyro_novalidate` is the same with
  `numpyro.validation_enabled(False)` around the traced body (the flag is read at trace time).
- `grad_assess`: `jax.grad` of the log joint (`regression.assess`) with respect to
  slope, noise and xs, jitted. `batch` = 1 is one point (dominated by dispatch overhead);
  `batch` = 10,000 vmaps the gradient over 10,000 (slope, noise) points.
  `framework` vs `handcoded` (jnp log joint, same densities) vs `numpyro`, which is
  `numpyro.infer.util.log_density(model, (xs, ys), {}, {"slope": .., "noise": ..})[0]`
  (default settings: validation on), differentiated w.r.t. slope, noise and xs like the
  others; `numpyro_novalidate` as above.

Output: one JSON object per line on stdout (progress goes to stderr), all with the keys

  benchmark, impl, batch       what was run (batch: particles or gradient points)
  run_ms_median, run_ms_iqr    median and interquartile range of the per-call wall time
                               (ms, `time.perf_counter`, after warm-up; outputs are
                               blocked on with `jax.block_until_ready`)
  repeats                      timed samples; implementations of a benchmark are timed
                               interleaved, round-robin, so load drift hits all alike
  compile_ms                   wall time of the first call on a fresh jit after
                               `jax.clear_caches()`: tracing + compilation + one run
  ratio_vs_handcoded           run_ms_median / that of the same-computation baseline
                               (`handcoded_keys` or `handcoded`); < 1.1 is the target
  ratio_vs_lower_bound         run_ms_median / that of `handcoded_batched` (importance
                               only, else null)
  log_marginal, log_marginal_se  the estimate and its Monte Carlo standard error
                               sqrt(1/ESS - 1/N) (importance only, else null)
  grad_max_abs_diff            max |impl - handcoded| over all gradient entries (0 for
                               `handcoded` itself; grad_assess only, else null)
  jax, numpyro, backend, device

Before timing, the script checks that every implementation computes the same thing (log
marginals within Monte Carlo error of the framework's, gradients equal to float32
rounding); if not it exits with status 1 and a message on stderr. On a shared machine,
compare ratios within one run, and look at run_ms_iqr before trusting a ratio near 1.1.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.scipy.special import logsumexp
from numpyro.infer import Predictive, log_likelihood
from numpyro.infer.util import log_density

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
import _common  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from _common import (  # noqa: E402
    first_call_ms,
    is_handcoded_batched,
    is_handcoded_keys,
    log,
    log_joint,
    make_data,
    time_interleaved,
)

import inference  # noqa: E402
import ppl  # noqa: E402


@ppl.gen
def regression(xs):
    slope = ppl.sample("slope", dist.Normal(0.0, 1.0))
    noise = ppl.sample("noise", dist.HalfNormal(1.0))
    return ppl.sample("ys", dist.Normal(slope * xs, noise))


# -- NumPyro -------------------------------------------------------------------------------
def numpyro_regression(xs, ys=None):
    slope = numpyro.sample("slope", dist.Normal(0.0, 1.0))
    noise = numpyro.sample("noise", dist.HalfNormal(1.0))
    return numpyro.sample("ys", dist.Normal(slope * xs, noise), obs=ys)


def is_numpyro(key, xs, ys, n):
    prior = Predictive(numpyro_regression, num_samples=n, return_sites=["slope", "noise"],
                       parallel=True)(key, xs)
    logw = log_likelihood(numpyro_regression, prior, xs, ys, parallel=True)["ys"].sum(-1)
    return logsumexp(logw) - math.log(n), logw, prior["slope"], prior["noise"]


def numpyro_log_joint(slope, noise, xs, ys):
    return log_density(numpyro_regression, (xs, ys), {}, {"slope": slope, "noise": noise})[0]


def novalidate(f):
    """`f` traced with NumPyro's validation off (distributions read the flag when built)."""
    def wrapped(*args):
        with numpyro.validation_enabled(False):
            return f(*args)
    return wrapped


def emit(*args, **kwargs):
    _common.emit(*args, numpyro=numpyro.__version__, **kwargs)


def fail(msg):
    sys.exit(f"benchmarks/core.py: FAILED CHECK: {msg}")  # message to stderr, status 1


# -- benchmarks ----------------------------------------------------------------------------
def bench_importance(xs, ys, n, repeats, warmup):
    key, obs = jax.random.key(0), {"ys": ys}
    run = lambda k: inference.importance(k, regression, (xs,), obs, n)  # noqa: E731
    makers = {
        "framework_direct": lambda: run,
        "framework_jit": lambda: jax.jit(lambda k: run(k).log_marginal),
        "handcoded_keys": lambda: jax.jit(lambda k: is_handcoded_keys(k, xs, ys, n)),
        "handcoded_batched": lambda: jax.jit(lambda k: is_handcoded_batched(k, xs, ys, n)),
        "numpyro": lambda: jax.jit(lambda k: is_numpyro(k, xs, ys, n)),
        "numpyro_novalidate": lambda: jax.jit(novalidate(lambda k: is_numpyro(k, xs, ys, n))),
    }
    fns, compile_ms, lm = {}, {}, {}
    for name, make in makers.items():
        log(f"importance N={n}: compiling {name}")
        fns[name], out, compile_ms[name] = first_call_ms(make, (key,))
        if name == "framework_direct":
            lm[name] = float(out.log_marginal)
            se = math.sqrt(max(1.0 / float(out.ess) - 1.0 / n, 0.0))
        else:
            lm[name] = float(out if name == "framework_jit" else out[0])
    # Independent estimates differ by ~sqrt(2) se; allow 5 of those (plus float32 rounding).
    tol = 5 * math.sqrt(2) * se + 1e-3 * (1 + abs(lm["framework_direct"]))
    for name, v in lm.items():
        if not abs(v - lm["framework_direct"]) <= tol:
            fail(f"importance: log marginal of {name} = {v:.4f} but framework_direct gives "
                 f"{lm['framework_direct']:.4f} (tolerance {tol:.4f}, MC se {se:.4f}): "
                 "the implementations do not compute the same thing.")
    log(f"importance N={n}: timing {repeats} x {len(fns)} (interleaved)")
    samples = time_interleaved(fns, (key,), repeats, warmup)
    ref, low = (float(np.median(samples[k])) for k in ("handcoded_keys", "handcoded_batched"))
    for name in fns:
        emit("importance", name, n, samples[name], compile_ms[name], ref, low,
             log_marginal=round(lm[name], 4), log_marginal_se=round(se, 4))


def bench_grad(xs, ys, batch, repeats, warmup, number):
    def fw(slope, noise, xs, ys):
        return regression.assess({"slope": slope, "noise": noise, "ys": ys}, (xs,))[0]

    def build(f):
        g = jax.grad(f, argnums=(0, 1, 2))
        if batch > 1:
            g = jax.vmap(g, in_axes=(0, 0, None, None))
        return lambda: jax.jit(g)

    if batch == 1:
        slope, noise = jnp.float32(0.5), jnp.float32(0.8)
    else:
        k1, k2 = jax.random.split(jax.random.key(2))
        slope, noise = jax.random.normal(k1, (batch,)), 0.1 + jnp.abs(jax.random.normal(k2, (batch,)))
    args = (slope, noise, xs, ys)
    impls = {"framework": fw, "handcoded": log_joint, "numpyro": numpyro_log_joint,
             "numpyro_novalidate": novalidate(numpyro_log_joint)}
    fns, compile_ms, outs, diff = {}, {}, {}, {}
    for name, f in impls.items():
        log(f"grad_assess batch={batch}: compiling {name}")
        fns[name], outs[name], compile_ms[name] = first_call_ms(build(f), args)
    for name in fns:
        diff[name], scale = 0.0, 1.0
        for a, b in zip(outs[name], outs["handcoded"]):
            a, b = np.asarray(a), np.asarray(b)
            if a.shape != b.shape:
                fail(f"grad_assess: gradient shapes of {name} and handcoded differ, {a.shape} vs {b.shape}")
            diff[name] = max(diff[name], float(np.max(np.abs(a - b))))
            scale = max(scale, float(np.max(np.abs(b))))
        if not (np.isfinite(diff[name]) and diff[name] <= 1e-4 * scale):
            fail(f"grad_assess batch={batch}: {name} and hand-coded gradients differ by "
                 f"{diff[name]:.3g} (largest gradient entry {scale:.3g}).")
    log(f"grad_assess batch={batch}: timing {repeats} x {number} calls (interleaved)")
    samples = time_interleaved(fns, args, repeats, warmup, number)
    ref = float(np.median(samples["handcoded"]))
    for name in fns:
        emit("grad_assess", name, batch, samples[name], compile_ms[name], ref,
             grad_max_abs_diff=float(f"{diff[name]:.3g}"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke run)")
    a = p.parse_args(argv)
    xs, ys = make_data(100)
    # Pay process-wide one-time costs (lazy imports, backend set-up, small helper jits)
    # before any compile timing, so they are not charged to whichever impl runs first.
    inference.importance(jax.random.key(0), regression, (xs,), {"ys": ys}, 2)
    jax.block_until_ready(jax.jit(is_handcoded_keys, static_argnums=3)(jax.random.key(0), xs, ys, 2))
    jax.block_until_ready(jax.jit(is_numpyro, static_argnums=3)(jax.random.key(0), xs, ys, 2))
    if a.quick:
        bench_importance(xs, ys, n=2_000, repeats=5, warmup=1)
        bench_grad(xs, ys, batch=1, repeats=5, warmup=1, number=10)
        bench_grad(xs, ys, batch=500, repeats=5, warmup=1, number=1)
    else:
        bench_importance(xs, ys, n=100_000, repeats=30, warmup=3)
        bench_grad(xs, ys, batch=1, repeats=50, warmup=3, number=50)
        bench_grad(xs, ys, batch=10_000, repeats=100, warmup=3, number=1)


if __name__ == "__main__":
    main()
