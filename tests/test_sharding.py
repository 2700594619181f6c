"""Particles shard across devices (4 forced CPU devices, in a subprocess so that the
XLA flag takes effect before JAX starts) and give the single-device answer."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    import numpyro.distributions as dist
    import inference, ppl

    assert jax.device_count() == 4, jax.devices()

    @ppl.gen
    def model(n):
        mu = ppl.sample("mu", dist.Normal(0.0, 1.0))
        return ppl.sample("y", dist.Normal(mu, 1.0).expand((n,)))

    y = jnp.array([0.5, 1.0, 1.5])
    res = inference.importance(jax.random.key(0), model, (3,), {"y": y}, 4096)
    assert len(res.log_weights.sharding.device_set) == 4, res.log_weights.sharding
    assert len(res.traces["mu"].sharding.device_set) == 4

    # the same computation pinned to one device: particle i runs under particle_key(k_model, i)
    k_model = jax.random.split(jax.random.key(0))[0]
    with jax.default_device(jax.devices()[0]):
        one = jax.jit(
            lambda k: jax.vmap(lambda i: model.generate(ppl.particle_key(k, i), {"y": y}, (3,))[1])(jnp.arange(4096))
        )(k_model)
    np.testing.assert_allclose(np.asarray(res.log_weights), np.asarray(one), rtol=1e-6, atol=1e-6)
    print("sharded ok", float(res.log_marginal))
    """
)


def test_importance_particles_shard_over_four_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sharded ok" in out.stdout


NUTS_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    import numpyro.distributions as dist
    from numpyro.diagnostics import effective_sample_size
    import inference, ppl

    assert jax.device_count() == 4, jax.devices()
    calls = []
    import inference._runner as runner
    original = runner._over_devices
    def spy(fn, num_chains, uniform):
        out = original(fn, num_chains, uniform)
        calls.append(out is not fn)
        return out
    runner._over_devices = spy

    @ppl.gen
    def model():
        mu = ppl.sample("mu", dist.Normal(0.0, 1.0))
        return ppl.sample("y", dist.Normal(mu, 1.0).expand((4,)))

    y = jnp.array([0.5, 1.0, 1.5, 2.0])
    s = inference.run_nuts(jax.random.key(0), model, (), {"y": y}, num_warmup=300, num_samples=500,
                           num_chains=4, progress_bar=False)
    assert calls and all(calls), calls  # every chunk ran as one shard per device
    # one program for every chunk (the inputs are placed as the chunks' outputs are), and
    # none more for a second run with new data
    inference.run_nuts(jax.random.key(1), model, (), {"y": y + 1.0}, num_warmup=300, num_samples=500,
                       num_chains=4, progress_bar=False)
    assert len(runner._CHUNK_PROGRAMS) == 1 and runner._run_chunk._cache_size() == 0
    mu = np.asarray(s["mu"])
    exact_mean, exact_sd = y.sum() / 5, (1 / 5) ** 0.5  # conjugate normal
    ess = float(effective_sample_size(mu))
    assert abs(mu.mean() - exact_mean) < 5 * exact_sd / ess**0.5, (mu.mean(), exact_mean, ess)
    print("sharded chains ok", mu.mean(), ess)
    """
)


def test_nuts_chains_run_one_shard_per_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", NUTS_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sharded chains ok" in out.stdout


def test_importing_the_packages_leaves_the_device_count_open():
    """Importing the packages makes no JAX array, so the CPU device count can still be set
    afterwards (as numpyro.set_host_device_count does, through XLA_FLAGS)."""
    script = textwrap.dedent(
        """
        import ppl, inference, smc, smc.llm, vi
        import numpyro
        numpyro.set_host_device_count(4)
        import jax
        print("devices", jax.device_count())
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "devices 4" in out.stdout, out.stdout
