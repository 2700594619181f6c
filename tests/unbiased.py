"""Checks that gradient estimates are unbiased: the mean of m independent estimates
against the exact value, within Z standard errors of that mean (fixed seeds)."""

import math

import jax
import numpy as np

import vi

Z = 5.0  # standard errors allowed


def estimates(objective, params, m, seed=0):
    """m independent (value, grad) estimates, vmapped over keys."""
    g = jax.jit(jax.vmap(vi.grad(objective), in_axes=(0, None)))
    return g(jax.random.split(jax.random.key(seed), m), params)


def assert_unbiased(samples, exact, z=Z):
    samples = np.asarray(samples, dtype=np.float64)
    mean = samples.mean(0)
    se = samples.std(0, ddof=1) / math.sqrt(samples.shape[0])
    exact = np.asarray(exact, dtype=np.float64)
    assert np.all(np.abs(mean - exact) <= z * se + 1e-6), (mean, exact, se)
