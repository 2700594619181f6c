"""Test configuration: fixed seeds, warnings as errors (pyproject), shared helpers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Tests run in float32, as users do; tolerances below are stated per test.
jax.config.update("jax_enable_x64", False)


@pytest.fixture
def key():
    return jax.random.key(0)


def assert_close(a, b, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def tree_allclose(a, b, rtol=1e-5, atol=1e-5):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert_close(jnp.asarray(x, dtype=float), jnp.asarray(y, dtype=float), rtol, atol)
