"""The key discipline: reproducible, independent draws at about one hash per value.

Statistical checks use N independent standard normals, whose sample correlation and
mean have standard error 1/sqrt(N); a bound of 4.5 standard errors has a false-alarm
rate of about 7e-6 per check (two-sided normal tail), and the seeds are fixed.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from jax.extend.random import threefry2x32_p

import inference
import ppl
from ppl._keys import threefry2x32

N = 4096
Z = 4.5  # standard errors; two-sided false alarm ~7e-6 per check


def _corr(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.corrcoef(a, b)[0, 1])


def test_threefry_block_equals_jax_primitive():
    counters = jax.random.bits(jax.random.key(3), (2, 257), jnp.uint32)
    kd = jax.random.key_data(jax.random.key(11))
    k0, k1 = jnp.broadcast_to(kd[0], (257,)), jnp.broadcast_to(kd[1], (257,))
    expected = threefry2x32_p.bind(k0, k1, counters[0], counters[1])
    ours = threefry2x32(kd[0], kd[1], counters[0], counters[1])
    for a, b in zip(ours, expected):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@ppl.gen
def two_sites():
    a = ppl.sample("a", dist.Normal(0.0, 1.0))
    b = ppl.sample("b", dist.Normal(0.0, 1.0))
    return a + b


def _particles(model, key, n, args=()):
    return jax.vmap(lambda i: model.simulate(ppl.particle_key(key, i), args))(jnp.arange(n))


def test_particle_draws_are_independent_across_particles_and_sites():
    tr = jax.jit(lambda k: _particles(two_sites, k, N))(jax.random.key(0))
    a, b = np.asarray(tr["a"]), np.asarray(tr["b"])
    se = 1 / math.sqrt(N)
    assert abs(_corr(a, b)) < Z * se  # across sites, same particle
    assert abs(_corr(a[:-1], a[1:])) < Z * se  # neighbouring particles
    assert abs(_corr(a[:-1], b[1:])) < Z * se
    assert abs(a.mean()) < Z * se and abs(a.var() - 1) < Z * math.sqrt(2 / N)
    assert len(np.unique(a)) == N


def test_particle_keys_reproduce_bit_for_bit_and_match_a_loop():
    key = jax.random.key(5)
    batch = jax.jit(lambda k: _particles(two_sites, k, 8))(key)
    again = jax.jit(lambda k: _particles(two_sites, k, 8))(key)
    np.testing.assert_array_equal(batch["a"], again["a"])
    for i in range(8):
        one = two_sites.simulate(ppl.particle_key(key, i), ())
        assert one["a"] == batch["a"][i] and one["b"] == batch["b"][i]


def test_vmap_of_simulate_over_user_keys_equals_a_loop():
    keys = jax.random.split(jax.random.key(2), 6)
    batch = jax.vmap(two_sites.simulate, in_axes=(0, None))(keys, ())
    for i in range(6):
        one = two_sites.simulate(keys[i], ())
        assert one["a"] == batch["a"][i] and one.score == batch.score[i]


def test_adding_a_site_leaves_the_other_draws_unchanged(key):
    @ppl.gen
    def more():
        a = ppl.sample("a", dist.Normal(0.0, 1.0))
        ppl.sample("extra", dist.Gamma(2.0, 1.0))
        b = ppl.sample("b", dist.Normal(0.0, 1.0))
        return a + b

    for k in (key, ppl.particle_key(key, 7)):
        x, y = two_sites.simulate(k, ()), more.simulate(k, ())
        assert x["a"] == y["a"] and x["b"] == y["b"]


def test_addresses_whose_crc32_collide_draw_independently(key):
    # The old key scheme folded in crc32(address) & 0x7FFFFFFF, equal for these two
    # addresses, so they received identical draws in every trace.
    import zlib

    assert zlib.crc32(b"msggzfqc") & 0x7FFFFFFF == zlib.crc32(b"wtxykwych") & 0x7FFFFFFF

    @ppl.gen
    def pair():
        return ppl.sample("msggzfqc", dist.Normal(0.0, 1.0)), ppl.sample("wtxykwych", dist.Normal(0.0, 1.0))

    tr = _particles(pair, key, N)
    assert abs(_corr(tr["msggzfqc"], tr["wtxykwych"])) < Z / math.sqrt(N)


def _max_cross_correlation(key, names, n):
    """max |r| over pairs of sites at `names`, from `n` particles."""

    @ppl.gen
    def many():
        return jnp.stack([ppl.sample(name, dist.Normal(0.0, 1.0)) for name in names])

    draws = np.asarray(jax.jit(lambda k: _particles(many, k, n))(key).retval)  # [n, sites]
    r = np.corrcoef(draws.T)
    return np.abs(r[~np.eye(len(names), dtype=bool)]).max()


def _random_names(seed, count, alphabet, length):
    rng = np.random.default_rng(seed)
    return sorted({"".join(rng.choice(list(alphabet), length)) for _ in range(count)})


def test_many_random_address_pairs_draw_independently(key):
    names = _random_names(0, 40, "abcdefghijklmnopqrstuvwxyz", 8)
    # 780 pairs of N=512 draws: |r| has s.e. 0.044; 0.3 is 6.8 s.e. (p ~1e-11 per pair),
    # while two sites sharing a key would give r = 1.
    assert _max_cross_correlation(key, names, 512) < 0.3


FAMILIES = [
    (dist.Normal(1.0, 2.0), 1.0, 2.0),
    (dist.HalfNormal(2.0), 2.0 * math.sqrt(2 / math.pi), 2.0 * math.sqrt(1 - 2 / math.pi)),
    (dist.LogNormal(0.0, 0.5), math.exp(0.125), math.sqrt((math.exp(0.25) - 1) * math.exp(0.25))),
    (dist.Uniform(-1.0, 3.0), 1.0, 4.0 / math.sqrt(12)),
    (dist.Exponential(2.0), 0.5, 0.5),
    (dist.Gamma(3.0, 2.0), 1.5, math.sqrt(3.0) / 2.0),  # through numpyro's sampler
    (dist.Poisson(3.0), 3.0, math.sqrt(3.0)),
]


@pytest.mark.parametrize("d, mean, sd", FAMILIES, ids=lambda x: type(x).__name__ if hasattr(x, "sample") else "")
def test_each_family_draws_its_distribution_under_particle_keys(d, mean, sd):
    @ppl.gen
    def one():
        return ppl.sample("x", d)

    x = np.asarray(jax.jit(lambda k: _particles(one, k, N))(jax.random.key(1))["x"], np.float64)
    assert abs(x.mean() - mean) < Z * sd / math.sqrt(N)
    assert bool(jnp.all(d.support(jnp.asarray(x, jnp.float32))))


def test_particle_keys_through_vmap_and_scan_combinators(key):
    @ppl.gen
    def point(x):
        return ppl.sample("z", dist.Normal(x, 1.0))

    @ppl.gen
    def step(c, _):
        z = ppl.sample("z", dist.Normal(0.0, 1.0))
        return c, z

    n, se = 2048, 1 / math.sqrt(2048)
    for model, args in ((ppl.vmap(point, in_axes=(0,)), (jnp.zeros(3),)), (ppl.scan(step, length=3), (0.0, None))):
        z = np.asarray(jax.jit(lambda k: _particles(model, k, n, args))(key)["z"])  # [particles, 3]
        assert abs(_corr(z[:, 0], z[:, 1])) < Z * se and abs(_corr(z[:, 1], z[:, 2])) < Z * se
        assert abs(_corr(z[:-1, 0], z[1:, 0])) < Z * se  # neighbouring particles, same element


def test_importance_is_reproducible_bit_for_bit(key):
    @ppl.gen
    def model():
        mu = ppl.sample("mu", dist.Normal(0.0, 1.0))
        return ppl.sample("y", dist.Normal(mu, 1.0))

    a = inference.importance(key, model, (), {"y": 0.3}, 1000)
    b = inference.importance(key, model, (), {"y": 0.3}, 1000)
    np.testing.assert_array_equal(a.log_weights, b.log_weights)
    np.testing.assert_array_equal(a.traces["mu"], b.traces["mu"])


def test_particle_key_rejects_bad_input(key):
    with pytest.raises(ppl.ArgumentError, match="integer scalar"):
        ppl.particle_key(key, jnp.arange(3))
    with pytest.raises(ppl.ArgumentError, match="already a particle key"):
        ppl.particle_key(ppl.particle_key(key, 0), 1)


@pytest.mark.slow
def test_many_random_address_pairs_draw_independently_thorough(key):
    names = _random_names(1, 300, "abcdefghijklmnopqrstuvwxyz0123456789_", 6)
    # 45,000 pairs, N=4096: s.e. 0.0156; 0.12 is 7.7 s.e. (p ~1e-14 per pair).
    assert _max_cross_correlation(key, names, 4096) < 0.12


def test_unrolled_key_splits_and_draws_like_a_prng():
    """The key numpyro's NUTS splits per leapfrog step: reproducible, children distinct,
    draws uniform. 20,000 uniforms: the mean's s.e. is 0.29/sqrt(20000) = 0.002, the
    tolerance 0.01 is 5 s.e.; the variance's s.e. is sqrt((1/80 - 1/144)/20000) = 0.00053,
    the tolerance 0.003 is 5.7 s.e.; the correlation between two split children's draws has
    s.e. 1/sqrt(20000) = 0.007, tolerance 0.035."""
    from ppl.extend import unrolled_key

    k = unrolled_key(jax.random.key(3))
    assert jax.dtypes.issubdtype(k.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(unrolled_key(jax.random.key(3))), jax.random.key_data(k))
    np.testing.assert_array_equal(jax.random.key_data(unrolled_key(jax.random.key_data(jax.random.key(3)))),
                                  jax.random.key_data(k))
    children = jax.random.split(k, 1000)
    data = np.asarray(jax.random.key_data(children))
    assert len({tuple(row) for row in data}) == 1000
    a, b = jax.random.split(k)
    ua, ub = jax.random.uniform(a, (20000,)), jax.random.uniform(b, (20000,))
    assert abs(float(ua.mean()) - 0.5) < 0.01 and abs(float(ua.var()) - 1 / 12) < 0.003
    assert abs(float(jnp.corrcoef(ua, ub)[0, 1])) < 0.035
    # under jit and vmap, the same as eager; another implementation's key passes through
    jitted = jax.jit(jax.vmap(lambda kk: jax.random.uniform(jax.random.fold_in(unrolled_key(kk), 7))))
    keys = jax.random.split(jax.random.key(0), 4)
    eager = [float(jax.random.uniform(jax.random.fold_in(unrolled_key(kk), 7))) for kk in keys]
    np.testing.assert_allclose(jitted(keys), eager)
    rbg = jax.random.key(0, impl="rbg")
    assert unrolled_key(rbg) is rbg
