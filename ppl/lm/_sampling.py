"""`Sampler`: temperature, top-k and top-p, as the next-token distribution they define.

The sampler turns a row of logits into the log probabilities actually sampled from, so
the density a step's `assess` reports is the density its `simulate` drew from (with the
defaults, the language model's own distribution).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .._errors import ArgumentError

__all__ = ["Sampler"]


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Next-token distribution from logits: temperature, then top-k, then top-p (nucleus).

    Fields:
      temperature: logits are divided by it; 0.0 means greedy (the argmax token, same as
                   `top_k=1`).
      top_k:       keep the k largest logits (None: all). Static: it fixes a shape.
      top_p:       keep the smallest set of most likely tokens whose probability (after
                   temperature and top-k) reaches top_p; 1.0 keeps all.

    `log_probs(logits)` gives the normalized log probabilities [V] (float32), -inf for
    excluded tokens. Tokens tied with the k-th largest logit are all kept.

    >>> Sampler(top_k=1).log_probs(jnp.array([0.0, 2.0, 1.0]))
    Array([-inf,   0., -inf], dtype=float32)
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ArgumentError(f"Sampler: temperature must be a number >= 0 (0 is greedy), got {self.temperature!r}.")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ArgumentError(f"Sampler: top_k must be a positive int or None, got {self.top_k!r}.")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ArgumentError(f"Sampler: top_p must lie in (0, 1], got {self.top_p!r}.")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def log_probs(self, logits) -> jax.Array:
        """Log probabilities [..., V] of the next token under these settings."""
        x = jnp.asarray(logits, jnp.float32)
        if self.is_greedy:
            best = jnp.argmax(x, axis=-1)[..., None]
            return jnp.where(jnp.arange(x.shape[-1]) == best, 0.0, -jnp.inf).astype(jnp.float32)
        if self.temperature != 1.0:
            x = x / self.temperature
        top = None
        if self.top_k is not None and self.top_k < x.shape[-1]:
            top = jax.lax.top_k(x, self.top_k)[0]  # descending
            x = jnp.where(x >= top[..., -1:], x, -jnp.inf)
        if self.top_p < 1.0:
            ranked = -jnp.sort(-x, axis=-1) if top is None else top
            probs = jax.nn.softmax(ranked, axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
            kept = jnp.sum(before < self.top_p, axis=-1, keepdims=True)  # at least 1
            threshold = jnp.take_along_axis(ranked, kept - 1, axis=-1)
            x = jnp.where(x >= threshold, x, -jnp.inf)
        return jax.nn.log_softmax(x, axis=-1)
