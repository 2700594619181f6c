"""`Transformer`: a decoder-only transformer (Llama / Qwen2 / Qwen3 blocks) in equinox.

Written for one row (one sequence); batches are `jax.vmap` of it. Layer weights are
stacked along a leading layer axis and the blocks run in one `lax.scan`, so compile
time does not grow with depth. Matrices are stored input-major (`x @ w`).

A KV cache is a `KVCache(keys, values)`, each [num_layers, cache_size, num_kv_heads,
head_dim]. `forward(tokens, positions, cache)` runs C tokens at their positions, writes
their keys and values at those positions (a position past the cache is dropped) and
lets the token at position p attend to cache entries 0..p. So a cache entry is read only
after the token at its position has been written: entries past a row's current length
may hold anything.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._config import TransformerConfig

__all__ = ["Transformer", "KVCache"]


class KVCache(NamedTuple):
    """Keys and values of one row, [num_layers, cache_size, num_kv_heads, head_dim] each."""

    keys: jax.Array
    values: jax.Array


class Transformer(eqx.Module):
    """Decoder-only transformer: embedding, `num_layers` pre-norm blocks, final norm, output layer.

    Fields:
      config: the `TransformerConfig` (static).
      embed:  [V, d] token embedding.
      layers: dict of weights stacked over layers: `attn_norm` [n, d], `q` [n, d, H*hd],
              `k`, `v` [n, d, KV*hd], `o` [n, H*hd, d], `mlp_norm` [n, d], `gate`, `up`
              [n, d, I], `down` [n, I, d]; optional `q_bias`, `k_bias`, `v_bias`,
              `o_bias`, `gate_bias`, `up_bias`, `down_bias`, `q_norm`, `k_norm` [n, hd].
      norm:   [d] final RMSNorm weight.
      lm_head: [d, V] output layer, or None when tied to the embedding.

    `model(tokens)` is the uncached forward pass: logits [C, V] of C tokens at positions
    0..C-1.

    >>> cfg = TransformerConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
    ...                         num_heads=4, num_kv_heads=2)
    >>> model = Transformer.random(jax.random.key(0), cfg)
    >>> model(jnp.array([1, 2, 3])).shape
    (3, 32)
    """

    config: TransformerConfig = eqx.field(static=True)
    embed: jax.Array
    layers: dict
    norm: jax.Array
    lm_head: jax.Array | None

    @classmethod
    def random(cls, key, config: TransformerConfig, dtype=jnp.float32, scale: float = 0.02) -> Transformer:
        """A model with N(0, scale^2) weights, unit norms and small random biases (for tests)."""
        return _random(key, config, dtype, scale)

    @property
    def dtype(self):
        return self.embed.dtype

    def init_cache(self, cache_size: int) -> KVCache:
        """An empty (zero) cache for one row of `cache_size` positions."""
        c = self.config
        shape = (c.num_layers, cache_size, c.num_kv_heads, c.head_dim)
        return KVCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))

    # -- forward passes ------------------------------------------------------------------------
    def __call__(self, tokens) -> jax.Array:
        """Uncached logits [C, V] (float32) of `tokens` [C] at positions 0..C-1."""
        return _uncached_logits(self, jnp.asarray(tokens, jnp.int32))

    def forward(self, tokens, positions, cache: KVCache | None):
        """Hidden states [C, d] of `tokens` [C] at `positions` [C] (int32), and the new cache.

        With `cache=None` the tokens attend to each other causally by position (no
        cache). With a cache, their keys and values are written at `positions` first
        (positions >= cache_size are dropped) and token c attends to cache entries
        0..positions[c]. Negative token ids (padding) are embedded as token 0.
        """
        c = self.config
        x = self.embed[jnp.maximum(tokens, 0)]
        cos, sin = _rotary(c.inv_freq(), positions, self.dtype)

        def block(carry, inputs):
            x, cache = carry
            w, layer = inputs
            h = _rms_norm(x, w["attn_norm"], c.rms_norm_eps)
            q = _linear(h, w["q"], w.get("q_bias")).reshape(-1, c.num_heads, c.head_dim)
            k = _linear(h, w["k"], w.get("k_bias")).reshape(-1, c.num_kv_heads, c.head_dim)
            v = _linear(h, w["v"], w.get("v_bias")).reshape(-1, c.num_kv_heads, c.head_dim)
            if c.qk_norm:
                q = _rms_norm(q, w["q_norm"], c.rms_norm_eps)
                k = _rms_norm(k, w["k_norm"], c.rms_norm_eps)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            if cache is None:
                keys, values, key_positions = k, v, positions
            else:
                cache = KVCache(cache.keys.at[layer, positions].set(k, mode="drop"),
                                cache.values.at[layer, positions].set(v, mode="drop"))
                keys, values = cache.keys[layer], cache.values[layer]
                key_positions = jnp.arange(keys.shape[0], dtype=positions.dtype)
            attn = _attention(q, keys, values, positions, key_positions, c.num_groups)
            x = x + _linear(attn.reshape(x.shape[0], -1), w["o"], w.get("o_bias"))
            h = _rms_norm(x, w["mlp_norm"], c.rms_norm_eps)
            gate = jax.nn.silu(_linear(h, w["gate"], w.get("gate_bias")))
            x = x + _linear(gate * _linear(h, w["up"], w.get("up_bias")), w["down"], w.get("down_bias"))
            return (x, cache), None

        (x, cache), _ = jax.lax.scan(block, (x, cache), (self.layers, jnp.arange(c.num_layers)))
        return _rms_norm(x, self.norm, c.rms_norm_eps), cache

    def logits(self, hidden) -> jax.Array:
        """Float32 logits [..., V] of final hidden states [..., d]."""
        head = self.embed.T if self.lm_head is None else self.lm_head
        return jnp.matmul(hidden, head, preferred_element_type=jnp.float32).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _random(key, config: TransformerConfig, dtype, scale: float) -> Transformer:
    c = config
    n, d, hd, inner = c.num_layers, c.hidden_size, c.head_dim, c.intermediate_size
    shapes = {"q": (n, d, c.num_heads * hd), "k": (n, d, c.num_kv_heads * hd), "v": (n, d, c.num_kv_heads * hd),
              "o": (n, c.num_heads * hd, d), "gate": (n, d, inner), "up": (n, d, inner), "down": (n, inner, d)}
    if c.qkv_bias:
        shapes.update(q_bias=(n, c.num_heads * hd), k_bias=(n, c.num_kv_heads * hd), v_bias=(n, c.num_kv_heads * hd))
    if c.output_bias:
        shapes.update(o_bias=(n, d))
    if c.mlp_bias:
        shapes.update(gate_bias=(n, inner), up_bias=(n, inner), down_bias=(n, d))
    shapes["embed"] = (c.vocab_size, d)
    if not c.tie_word_embeddings:
        shapes["lm_head"] = (d, c.vocab_size)
    sizes = [math.prod(shape) for shape in shapes.values()]
    flat = scale * jax.random.normal(key, (sum(sizes),))  # one draw: one threefry to compile
    pieces = jnp.split(flat, np.cumsum(sizes)[:-1])
    layers = {name: piece.reshape(shape) for (name, shape), piece in zip(shapes.items(), pieces)}
    embed, lm_head = layers.pop("embed"), layers.pop("lm_head", None)
    layers["attn_norm"] = jnp.ones((n, d))
    layers["mlp_norm"] = jnp.ones((n, d))
    if c.qk_norm:
        layers["q_norm"] = jnp.ones((n, hd))
        layers["k_norm"] = jnp.ones((n, hd))
    model = Transformer(c, embed, layers, jnp.ones((d,)), lm_head)
    return jax.tree.map(lambda x: x.astype(dtype), model)


@jax.jit
def _uncached_logits(model: Transformer, tokens):
    hidden, _ = model.forward(tokens, jnp.arange(tokens.shape[0], dtype=jnp.int32), None)
    return model.logits(hidden)


# -- pieces ---------------------------------------------------------------------------------------


def _linear(x, w, b=None):
    y = x @ w
    return y if b is None else y + b


def _rms_norm(x, weight, eps):
    """x / rms(x) * weight, the statistics in float32 (as the reference implementations)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def _rotary(inv_freq: np.ndarray, positions, dtype):
    """cos, sin [C, head_dim] of the rotation at `positions` (angles in float32)."""
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def _rotate(x, cos, sin):
    """Rotary embedding of x [C, heads, hd]: the two halves of each head rotate as pairs."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def _attention(q, keys, values, query_positions, key_positions, groups: int):
    """Causal grouped-query attention: q [C, H, hd], keys/values [S, KV, hd] -> [C, H, hd]."""
    num_queries, num_heads, hd = q.shape
    q = q.reshape(num_queries, num_heads // groups, groups, hd)
    scores = jnp.einsum("ckgd,skd->ckgs", q, keys, preferred_element_type=jnp.float32) / math.sqrt(hd)
    visible = key_positions[None, :] <= query_positions[:, None]  # [C, S]
    scores = jnp.where(visible[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("ckgs,skd->ckgd", probs, values)
    return out.reshape(num_queries, num_heads, hd)
