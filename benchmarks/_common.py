"""Shared pieces of the benchmark scripts: data, hand-coded baselines, timing, output rows.

Imports only jax and numpy, so that scripts running under another jax (the GenJAX peer,
in its own venv) share the exact data, baselines and methodology of `core.py`.
"""

from __future__ import annotations

import ctypes
import json
import math
import sys
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp
from jax.scipy.stats import norm


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory instead of returning it to the OS.

    By default glibc serves blocks above a (dynamic) threshold with `mmap` and unmaps them
    on `free`, and trims the heap top when a lot is freed at once. A call whose buffers are
    tens of MB then page-faults them in afresh every time, and how often depends on what ran
    just before it: measured at N = 100,000 (2-core CPU), an eager importance run took 22 ms
    instead of 6.5 ms, and a jitted run took 7.6 ms instead of 3.8 ms when it followed one
    in the round-robin. Holding freed memory takes the allocator's history out of every
    implementation's timing alike. Returns False where glibc is not there (macOS, musl).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(libc.mallopt(m_trim_threshold, 2**31 - 1)) and bool(
        libc.mallopt(m_mmap_threshold, 2**31 - 1))


def make_data(num_points=100):
    xs = jnp.linspace(-2.0, 2.0, num_points)
    ys = 0.7 * xs + 0.5 * jax.random.normal(jax.random.key(1), (num_points,))
    return xs, ys


# -- hand-coded plain JAX ------------------------------------------------------------------
def halfnormal_logpdf(x):
    return jnp.where(x >= 0, math.log(2.0) + norm.logpdf(x), -jnp.inf)


def log_joint(slope, noise, xs, ys):
    return norm.logpdf(slope) + halfnormal_logpdf(noise) + norm.logpdf(ys, slope * xs, noise).sum()


def site_key(key, address):  # one fold_in per site, as per-particle-key code written by hand does
    return jax.random.fold_in(key, zlib.crc32(address.encode()) & 0x7FFFFFFF)


def is_handcoded_keys(key, xs, ys, n):
    def particle(k):
        slope = jax.random.normal(site_key(k, "slope"))
        noise = jnp.abs(jax.random.normal(site_key(k, "noise")))
        return slope, noise, norm.logpdf(ys, slope * xs, noise).sum()

    slope, noise, logw = jax.vmap(particle)(jax.random.split(key, n))
    return logsumexp(logw) - math.log(n), logw, slope, noise


def is_handcoded_batched(key, xs, ys, n):
    k1, k2 = jax.random.split(key)
    slope = jax.random.normal(k1, (n,))
    noise = jnp.abs(jax.random.normal(k2, (n,)))
    logw = norm.logpdf(ys, slope[:, None] * xs, noise[:, None]).sum(-1)
    return logsumexp(logw) - math.log(n), logw, slope, noise


# -- linear-Gaussian state-space model (importance_scan) ------------------------------------
# z_0 = 0 (deterministic), z_t ~ Normal(A z_{t-1}, Q), y_t ~ Normal(z_t, R), t = 1..T.
LGSS_A, LGSS_Q, LGSS_R = 0.9, 1.0, 0.5


def make_lgss_data(num_steps=100):
    """ys [T] simulated from the model with a fixed key (float32, like the particles).

    Key 0: its first observations are typical draws (|y_t| < 3), so importance sampling
    on a short prefix (core.py's check against the Kalman filter) has a large ESS.
    """
    kz, ky = jax.random.split(jax.random.key(0))
    eps = jax.random.normal(kz, (num_steps,))
    _, zs = jax.lax.scan(lambda z, e: (LGSS_A * z + LGSS_Q * e,) * 2, jnp.zeros(()), eps)
    return zs + LGSS_R * jax.random.normal(ky, (num_steps,))


def kalman_log_likelihood(ys):
    """Exact log p(ys) of the model (Kalman filter in float64), from z_0 = 0 exactly."""
    m, p, ll = 0.0, 0.0, 0.0  # mean and variance of z_{t-1} given y_{1..t-1}
    for y in np.asarray(ys, dtype=np.float64):
        m, p = LGSS_A * m, LGSS_A**2 * p + LGSS_Q**2  # z_t given y_{1..t-1}
        s = p + LGSS_R**2  # y_t given y_{1..t-1}: Normal(m, s)
        ll += -0.5 * (math.log(2 * math.pi * s) + (y - m) ** 2 / s)
        gain = p / s
        m, p = m + gain * (y - m), (1.0 - gain) * p
    return ll


def is_scan_handcoded_keys(key, ys, n):
    """One key per particle; the step-t draw uses fold_in(particle key, t). zs: [N, T]."""
    def particle(k):
        def step(carry, t_y):
            z, logw = carry
            t, y = t_y
            z = LGSS_A * z + LGSS_Q * jax.random.normal(jax.random.fold_in(k, t))
            return (z, logw + norm.logpdf(y, z, LGSS_R)), z

        (_, logw), zs = jax.lax.scan(step, (jnp.zeros(()), jnp.zeros(())), (jnp.arange(len(ys)), ys))
        return zs, logw

    zs, logw = jax.vmap(particle)(jax.random.split(key, n))
    return logsumexp(logw) - math.log(n), logw, zs


def is_scan_handcoded_batched(key, ys, n):
    """All particles advanced together: normal(k_t, (N,)) per step, keys split(key, T). zs: [T, N]."""
    def step(carry, k_y):
        z, logw = carry
        k, y = k_y
        z = LGSS_A * z + LGSS_Q * jax.random.normal(k, (n,))
        return (z, logw + norm.logpdf(y, z, LGSS_R)), z

    init = (jnp.zeros((n,)), jnp.zeros((n,)))
    (_, logw), zs = jax.lax.scan(step, init, (jax.random.split(key, len(ys)), ys))
    return logsumexp(logw) - math.log(n), logw, zs


def mc_se(log_weights):
    """Monte Carlo s.e. of a log marginal estimate: sqrt(1/ESS - 1/N)."""
    logw = np.asarray(log_weights, dtype=np.float64)
    w = np.exp(logw - logw.max())
    ess = w.sum() ** 2 / (w**2).sum()
    return math.sqrt(max(1.0 / ess - 1.0 / len(logw), 0.0))


# -- timing --------------------------------------------------------------------------------
def first_call_ms(make, args):
    """Wall time of the first call of a fresh jit (trace + compile + one run), and its output."""
    jax.clear_caches()
    fn = make()
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return fn, out, (time.perf_counter() - t0) * 1e3


def time_interleaved(fns, args, repeats, warmup, number=1):
    """Per-call ms samples for each fn, round-robin; `number` calls per sample (tiny calls)."""
    for fn in [fn for _ in range(warmup) for fn in fns.values()]:
        jax.block_until_ready(fn(*args))
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(number):
                out = fn(*args)
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - t0) * 1e3 / number)
    return samples


def row(benchmark, impl, batch, samples, compile_ms, ref_ms, lower_ms=None, **extra):
    """One result as a dict in the shared schema (see core.py's docstring)."""
    q1, med, q3 = np.percentile(samples, [25, 50, 75])
    out = dict(
        benchmark=benchmark, impl=impl, batch=batch,
        run_ms_median=round(float(med), 4), run_ms_iqr=round(float(q3 - q1), 4),
        repeats=len(samples), compile_ms=round(compile_ms, 1),
        ratio_vs_handcoded=round(float(med) / ref_ms, 3),
        ratio_vs_lower_bound=None if lower_ms is None else round(float(med) / lower_ms, 3),
        log_marginal=None, log_marginal_se=None, log_marginal_exact=None, grad_max_abs_diff=None,
        jax=jax.__version__, numpyro=None, backend=jax.default_backend(),
        device=jax.devices()[0].device_kind,
    )
    out.update(extra)
    return out


def emit(*args, **kwargs):
    print(json.dumps(row(*args, **kwargs)), flush=True)


def log(msg):
    print(msg, file=sys.stderr, flush=True)
