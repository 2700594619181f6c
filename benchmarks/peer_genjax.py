"""Peer benchmark: GenJAX importance sampling against the same computation hand-coded in JAX.

The `importance` benchmark of `benchmarks/core.py`, run on GenJAX instead of this framework.
Model: Bayesian linear regression on 100 points, slope ~ Normal(0, 1),
noise ~ HalfNormal(1) (GenJAX's `half_normal`, a wrapper of TFP's `tfd.HalfNormal`),
ys ~ Normal(slope * xs, noise), with xs = linspace(-2, 2, 100) and
ys = 0.7 xs + 0.5 * normal(key(1), (100,)), generated exactly as in core.py (same data:
threefry, partitionable, in both jax versions). Prior-proposal importance sampling with
`batch` = 100,000 particles (2,000 with --quick) returning the log marginal likelihood.

Implementations (`impl` field):

- `genjax`: the idiomatic GenJAX route, `jax.jit` of
  `jax.vmap(model.importance, in_axes=(0, None, None))(jax.random.split(k, N),
  ChoiceMap.kw(ys=ys), (xs,))` followed by logsumexp(weights) - log N (GenJAX's own
  docstring example of bootstrap importance sampling). Only the log marginal is returned,
  like core.py's `framework_jit`, so XLA prunes the traces.
- `handcoded_keys`: core.py's `handcoded_keys` verbatim: `vmap` over one split key per
  particle, `fold_in(k, crc32(address))` per site, `jax.scipy.stats` densities. Same key
  scheme and data as core.py, so its log marginal equals core.py's to float rounding.
- `handcoded_batched`: core.py's `handcoded_batched`: `normal(k, (N,))` per site.

Timing as in core.py: implementations are timed interleaved round-robin (warm-up first),
median and IQR of the per-call wall time (`time.perf_counter`, outputs blocked on);
`compile_ms` is the first call of a fresh jit after `jax.clear_caches()`.
Output: one JSON line per impl on stdout with core.py's schema (benchmark, impl, batch,
run_ms_median, run_ms_iqr, repeats, compile_ms, ratio_vs_handcoded [vs handcoded_keys],
ratio_vs_lower_bound [vs handcoded_batched], log_marginal, log_marginal_se [sqrt(1/ESS - 1/N)
of that impl's own weights], grad_max_abs_diff [null], jax, numpyro [null], backend, device)
plus `genjax` (its version). Before timing it checks that GenJAX's log marginal agrees with
`handcoded_keys` within Monte Carlo error; if not it exits with status 1.

Why a separate process and venv: GenJAX 0.10.3 pins jax>=0.5,<0.6 (plus
tensorflow-probability), which cannot coexist with the repo's jax. So this script imports
only genjax, jax and numpy (not `ppl` / `inference`) and runs under its own interpreter.
Absolute times from two processes (and two jax versions) are not comparable; the ratios
against the hand-coded baselines measured in the same process are.

Run:

    python3 -m venv /tmp/genjax-venv
    /tmp/genjax-venv/bin/pip install genjax==0.10.3      # pulls jax 0.5.x, TFP, ...
    /tmp/genjax-venv/bin/python benchmarks/peer_genjax.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import sys

import _common  # benchmarks/ is on sys.path when run as a script
import genjax
import jax
import numpy as np
from _common import (
    first_call_ms,
    is_handcoded_batched,
    is_handcoded_keys,
    log,
    make_data,
    mc_se,
    time_interleaved,
)
from genjax import ChoiceMap, gen, half_normal, normal
from jax.scipy.special import logsumexp


# -- GenJAX --------------------------------------------------------------------------------
@gen
def regression(xs):
    slope = normal(0.0, 1.0) @ "slope"
    noise = half_normal(1.0) @ "noise"
    return normal(slope * xs, noise) @ "ys"


def is_genjax(key, xs, ys, n):
    keys = jax.random.split(key, n)
    _, logw = jax.vmap(regression.importance, in_axes=(0, None, None))(
        keys, ChoiceMap.kw(ys=ys), (xs,))
    return logsumexp(logw) - math.log(n), logw


def emit(impl, batch, samples, compile_ms, ref_ms, lower_ms, lm, se):
    _common.emit("importance", impl, batch, samples, compile_ms, ref_ms, lower_ms,
                 log_marginal=round(lm, 4), log_marginal_se=round(se, 4),
                 genjax=getattr(genjax, "__version__", None))


def bench_importance(xs, ys, n, repeats, warmup):
    key = jax.random.key(0)
    makers = {
        "genjax": lambda: jax.jit(lambda k: is_genjax(k, xs, ys, n)[0]),
        "handcoded_keys": lambda: jax.jit(lambda k: is_handcoded_keys(k, xs, ys, n)),
        "handcoded_batched": lambda: jax.jit(lambda k: is_handcoded_batched(k, xs, ys, n)),
    }
    fns, compile_ms, lm, se = {}, {}, {}, {}
    for name, make in makers.items():
        log(f"importance N={n}: compiling {name}")
        fns[name], out, compile_ms[name] = first_call_ms(make, (key,))
        if name == "genjax":  # the timed jit returns the log marginal only; weights for the se
            lm[name] = float(out)
            se[name] = mc_se(jax.jit(lambda k: is_genjax(k, xs, ys, n)[1])(key))
        else:
            lm[name], se[name] = float(out[0]), mc_se(out[1])
    ref = "handcoded_keys"
    # Independent estimates differ by ~sqrt(2) se; allow 5 of those (plus float32 rounding).
    tol = 5 * math.sqrt(2) * se[ref] + 1e-3 * (1 + abs(lm[ref]))
    for name, v in lm.items():
        if not abs(v - lm[ref]) <= tol:
            sys.exit(f"benchmarks/peer_genjax.py: FAILED CHECK: importance: log marginal of "
                     f"{name} = {v:.4f} but handcoded_keys gives {lm[ref]:.4f} (tolerance "
                     f"{tol:.4f}, MC se {se[ref]:.4f}): they do not compute the same thing.")
    log(f"importance N={n}: timing {repeats} x {len(fns)} (interleaved)")
    samples = time_interleaved(fns, (key,), repeats, warmup)
    ref_ms, low_ms = (float(np.median(samples[k])) for k in ("handcoded_keys", "handcoded_batched"))
    for name in fns:
        emit(name, n, samples[name], compile_ms[name], ref_ms, low_ms, lm[name], se[name])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke run)")
    a = p.parse_args(argv)
    xs, ys = make_data(100)
    # Pay process-wide one-time costs (lazy imports, backend set-up, TFP/GenJAX module
    # set-up) before any compile timing, so they are not charged to whichever impl runs first.
    jax.block_until_ready(jax.jit(is_genjax, static_argnums=3)(jax.random.key(0), xs, ys, 2))
    jax.block_until_ready(jax.jit(is_handcoded_keys, static_argnums=3)(jax.random.key(0), xs, ys, 2))
    if a.quick:
        bench_importance(xs, ys, n=2_000, repeats=5, warmup=1)
    else:
        bench_importance(xs, ys, n=100_000, repeats=30, warmup=3)


if __name__ == "__main__":
    main()
