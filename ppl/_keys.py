"""Random keys of the core: site keys, particle keys, and draws at about one hash per value.

Every random choice draws from a key derived from the caller's key and the site's
address, so the same key gives the same trace bit for bit and adding a site does not
change the draws of the others. Two kinds of key reach a generative function:

- a `jax.random` key (what a user passes; `jax.vmap(gf.simulate, in_axes=(0, None))`
  over split keys works as usual);
- a `ParticleKey(key, index)`, what inference passes for particle `index` of a batch
  (`particle_key`). Its `key` is shared by the whole batch, so under `jax.vmap` over the
  index every address-derived key is computed once for the batch, not once per
  particle, and the draw of particle `i` at a site hashes the counter `(i, position)`
  under the site's key: one Threefry-2x32 block per drawn value, as batched hand-written
  code (`jax.random.normal(key, (N,))`) does.

Threefry-2x32 is a keyed pseudo-random function of a 64-bit counter (Salmon et al.,
"Parallel random numbers: as easy as 1, 2, 3", SC 2011): distinct (key, counter) pairs
give independent blocks. Site keys come from a 64-bit digest of the full address folded
in one block, so two addresses collide with probability 2^-64, not 2^-32.

Draws of the common families (Normal, HalfNormal, LogNormal, Uniform, Exponential) are
computed here from the counter blocks with the key words as scalars (XLA keeps them out
of the per-value work). Other families call numpyro's `sample` with a typed key of a
small PRNG implementation over (key, index) whose bits are the same counter blocks.
"""

from __future__ import annotations

import hashlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.extend.random import define_prng_impl, threefry_2x32

from ._errors import ArgumentError

__all__ = [
    "ParticleKey", "particle_key", "is_key", "site_key", "fold", "split", "step_key", "draw", "as_jax_key",
    "unrolled_key",
]

_U32 = jnp.uint32
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = 0x1BD11BDA


def _rotl(v, r: int):
    return (v << _U32(r)) | (v >> _U32(32 - r))


@jax.jit  # traced once per signature: a model with many sites stays quick to trace
def threefry2x32(k0, k1, x0, x1):
    """The Threefry-2x32 block (20 rounds) of counters `(x0, x1)` under key `(k0, k1)`.

    Written with jnp operations so that scalar key words stay scalars under `vmap`
    (JAX's threefry primitive broadcasts them to the counters' shape, and its CPU
    lowering loops over the rounds: 1.2x slower on importance sampling). Equal to
    `jax.random`'s threefry bit for bit (tested).
    """
    schedule = (k0, k1, k0 ^ k1 ^ _U32(_PARITY))
    x0, x1 = x0 + k0, x1 + k1
    for block in range(5):
        for r in _ROTATIONS[block % 2]:
            x0 = x0 + x1
            x1 = _rotl(x1, r) ^ x0
        x0 = x0 + schedule[(block + 1) % 3]
        x1 = x1 + schedule[(block + 2) % 3] + _U32(block + 1)
    return x0, x1


# ----------------------------------------------------------------------------------------
# Particle keys
# ----------------------------------------------------------------------------------------


@jax.tree_util.register_pytree_node_class
class ParticleKey:
    """The key of particle `index` in a batch sharing `key`.

    Accepted by every GFI method in place of a `jax.random` key. Particles with distinct
    indices draw independently; the same `(key, index)` gives the same draws. Build it
    with `particle_key`.
    """

    __slots__ = ("key", "index")

    def __init__(self, key, index):
        self.key = key
        self.index = index

    def tree_flatten(self):
        return (self.key, self.index), None

    @classmethod
    def tree_unflatten(cls, _, children):
        return cls(*children)

    def __repr__(self):
        return f"ParticleKey(index={self.index!r})"


def particle_key(key, index) -> ParticleKey:
    """The key of particle `index` (an integer scalar, traced or not) drawn under `key`.

    Use it to run a batch of particles: vmap over the index, not over split keys.
    Particle `i`'s draws are independent of particle `j`'s for `i != j`, and under
    `jax.vmap` over the index every address-derived key is computed once per batch.

    >>> import numpyro.distributions as dist, ppl
    >>> @ppl.gen
    ... def model():
    ...     return ppl.sample("x", dist.Normal(0.0, 1.0))
    >>> key = jax.random.key(0)
    >>> run = lambda i: model.simulate(particle_key(key, i), ())["x"]
    >>> jax.vmap(run)(jnp.arange(4)).shape
    (4,)
    """
    if isinstance(key, ParticleKey):
        raise ArgumentError("particle_key: `key` is already a particle key; pass the batch's jax.random key.")
    index = jnp.asarray(index)
    if index.shape != () or not jnp.issubdtype(index.dtype, jnp.integer):
        raise ArgumentError(
            f"particle_key: index must be an integer scalar, got {index.dtype}{list(index.shape)}; "
            "vmap over the indices of a batch: jax.vmap(lambda i: f(particle_key(key, i)))(jnp.arange(n))."
        )
    return ParticleKey(key, index.astype(_U32))


def is_key(x) -> bool:
    """A `jax.random` key (typed, or a raw uint32[2]) or a `ParticleKey`."""
    if isinstance(x, ParticleKey):
        return True
    dtype = getattr(x, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return True
    return dtype == jnp.uint32 and getattr(x, "shape", None) == (2,)


# ----------------------------------------------------------------------------------------
# Deriving keys
# ----------------------------------------------------------------------------------------


def _address_words(address: str) -> tuple[int, int]:
    digest = hashlib.blake2b(address.encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def _is_threefry(key) -> bool:
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return False
    return str(jax.random.key_impl(key)) == "threefry2x32"


def _fold_words(key, w0: int, w1: int):
    """A new key from `key` and 64 bits of data, in one Threefry block."""
    if _is_threefry(key):
        block = threefry_2x32(jax.random.key_data(key), jnp.array([w0, w1], _U32))
        return jax.random.wrap_key_data(block, impl="threefry2x32")
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)  # a raw uint32[2] key
        return jax.random.key_data(_fold_words(key, w0, w1))
    return jax.random.fold_in(jax.random.fold_in(key, w0), w1)  # another PRNG: two folds


def site_key(key, address: str):
    """The key of the site at `address` (a string), of the same kind as `key`."""
    w0, w1 = _address_words(address)
    if isinstance(key, ParticleKey):
        return ParticleKey(_fold_words(key.key, w0, w1), key.index)
    return _fold_words(key, w0, w1)


def fold(key, data: int):
    """`key` with the static integer `data` folded in (a stream of its own)."""
    if isinstance(key, ParticleKey):
        return ParticleKey(jax.random.fold_in(key.key, data), key.index)
    return jax.random.fold_in(key, data)


def split(key, n: int):
    """`(keys, in_axes)`: `n` independent keys to `jax.vmap` over with `in_axes`."""
    if isinstance(key, ParticleKey):
        # The element keys are shared by the batch of particles; the index stays.
        return ParticleKey(jax.random.split(key.key, n), key.index), ParticleKey(0, None)
    return jax.random.split(key, n), 0


def step_key(key, t):
    """The key of step `t` (an integer, traced or not) of a scan run under `key`.

    One hash per step whatever `t` is, so stepping a scan one step at a time costs the
    same at every step; under a particle key the hash is shared by the batch.
    """
    if isinstance(key, ParticleKey):
        return ParticleKey(jax.random.fold_in(key.key, t), key.index)
    return jax.random.fold_in(key, t)


# ----------------------------------------------------------------------------------------
# Draws
# ----------------------------------------------------------------------------------------


def _counter_bits(key, index, shape):
    """uint32 bits of `shape`: Threefry blocks of counters (index, position) under `key`."""
    kd = jax.random.key_data(key)
    size = math.prod(shape)
    position = jax.lax.iota(_U32, size).reshape(shape) if shape else _U32(0)
    b0, b1 = threefry2x32(kd[0], kd[1], jnp.broadcast_to(index, shape), position)
    return b0 ^ b1


def _unit_uniform(bits):
    """[0, 1) floats from uint32 bits (23 mantissa bits)."""
    return jax.lax.bitcast_convert_type((bits >> _U32(9)) | _U32(0x3F800000), jnp.float32) - 1.0


def _std_normal(bits):
    lo = np.nextafter(np.float32(-1.0), np.float32(0.0))
    u = jnp.maximum(lo, _unit_uniform(bits) * (1.0 - lo) + lo)  # in (-1, 1)
    return np.float32(math.sqrt(2.0)) * jax.lax.erf_inv(u)


def _float(x):
    return jnp.asarray(x, dtype=jnp.result_type(float))


# family -> value from (distribution, uint32 bits of the sample shape)
_FAST_SAMPLERS = {
    dist.Normal: lambda d, b: d.loc + d.scale * _std_normal(b),
    dist.HalfNormal: lambda d, b: d.scale * jnp.abs(_std_normal(b)),
    dist.LogNormal: lambda d, b: jnp.exp(d.loc + d.scale * _std_normal(b)),
    dist.Uniform: lambda d, b: d.low + (d.high - d.low) * _unit_uniform(b),
    dist.Exponential: lambda d, b: -jnp.log1p(-_unit_uniform(b)) / d.rate,
}
_RESHAPING = (dist.Independent, dist.ExpandedDistribution)


def _fast_sampler(d):
    base = d
    while type(base) in _RESHAPING:
        base = base.base_dist
    fast = _FAST_SAMPLERS.get(type(base))
    if fast is None or jnp.result_type(float) != jnp.float32:
        return None
    return lambda bits: jnp.broadcast_to(_float(fast(base, bits)), bits.shape)


def draw(d, key):
    """One sample of numpyro distribution `d` under a site key (jax key or ParticleKey)."""
    shape = tuple(d.batch_shape) + tuple(d.event_shape)
    if isinstance(key, ParticleKey):
        base_key, index = key.key, key.index
    else:
        base_key, index = key, _U32(0)
    if _is_threefry(base_key):
        fast = _fast_sampler(d)
        if fast is not None:
            return fast(_counter_bits(base_key, index, shape))
    try:
        return d.sample(as_jax_key(key))
    except NotImplementedError:
        # jax.random.poisson (and a few others) accept threefry keys only: give the
        # particle a threefry key of its own, at one extra hash per particle.
        return d.sample(jax.random.fold_in(base_key, index))


# A typed-key PRNG over (key words, index), so numpyro's samplers of the other families
# draw from the particle's counter stream. random_bits hashes (index, position) under the
# key; split and fold_in derive fresh keys (index 0) in domains of their own.
_SPLIT_DOMAIN, _FOLD_DOMAIN = 0xFFFFFFFF, 0xFFFFFFFE


def _impl_bits(kd, bit_width, shape):
    size = math.prod(shape)
    position = jax.lax.iota(_U32, size).reshape(shape) if shape else _U32(0)
    b0, b1 = threefry2x32(kd[0], kd[1], jnp.broadcast_to(kd[2], shape), position)
    if bit_width == 64:
        return (b0.astype(jnp.uint64) << jnp.uint64(32)) | b1.astype(jnp.uint64)
    return (b0 ^ b1).astype({8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[bit_width])


def _impl_derive(kd, domain, counters):
    d0, d1 = threefry2x32(kd[0], kd[1], _U32(0xFFFFFFFF), _U32(domain))
    shape = jnp.shape(counters)
    n0, n1 = threefry2x32(d0, d1, jnp.broadcast_to(kd[2], shape), counters)
    return jnp.stack([n0, n1, jnp.zeros(shape, _U32)], axis=-1)


def _impl_split(kd, shape):
    return _impl_derive(kd, _SPLIT_DOMAIN, jax.lax.iota(_U32, math.prod(shape)).reshape(shape))


def _impl_fold_in(kd, data):
    return _impl_derive(kd, _FOLD_DOMAIN, jnp.asarray(data, _U32))


def _impl_seed(seed):
    seed = jnp.asarray(seed)
    return jnp.stack([_U32(0), seed.astype(_U32), _U32(0)])


_PARTICLE_PRNG = define_prng_impl(
    key_shape=(3,), seed=_impl_seed, split=_impl_split, random_bits=_impl_bits,
    fold_in=_impl_fold_in, name="ppl_particle", tag="ppl",
)


def as_jax_key(key):
    """A typed `jax.random` key for `key` (a ParticleKey becomes a key of its stream)."""
    if not isinstance(key, ParticleKey):
        return key
    if not _is_threefry(key.key):
        return jax.random.fold_in(key.key, key.index)
    kd = jax.random.key_data(key.key)
    return jax.random.wrap_key_data(jnp.concatenate([kd, key.index[None]]), impl=_PARTICLE_PRNG)


def unrolled_key(key):
    """`key` as a typed key whose `split`, `fold_in` and draws run Threefry unrolled.

    For a library that splits keys in its inner loop (numpyro's NUTS splits twice per
    leapfrog step). On CPU, `jax.random`'s threefry lowers to a loop over its five round
    blocks, several small kernels per call; the unrolled form is one fused kernel:
    eight schools under numpyro's NUTS, 4 chains vmapped, ran 11.5 -> 7.6 us per
    leapfrog step.
    Same Threefry-2x32 function, other derivations (the stream differs from `key`'s
    own). A `ParticleKey` gives its particle's stream; a key of another PRNG
    implementation is returned as it is.
    """
    if isinstance(key, ParticleKey):
        return as_jax_key(key)
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if not _is_threefry(key):
            return key
        key = jax.random.key_data(key)
    return jax.random.wrap_key_data(jnp.concatenate([jnp.asarray(key, _U32), jnp.zeros((1,), _U32)]),
                                    impl=_PARTICLE_PRNG)
