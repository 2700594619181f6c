"""`LMState`: one row's text so far and its KV cache; `init_state` builds it from a prompt.

Shapes for a context of S positions (S = the cache size, static):

- `tokens` int32 [S]: the prompt then the generated tokens; positions >= `length` hold
  `PAD` (-1).
- `length` int32 []: the number of tokens so far (1 <= length <= S).
- `cache` (`KVCache`): keys and values [num_layers, S, num_kv_heads, head_dim] of the
  tokens at positions 0..length-2. The last token (at length-1) is pending: its keys
  and values are computed when the next token is drawn. Entries at positions >=
  length-1 are unspecified (each is written before it is read).
- `prompt_length` int32 []: where the prompt ends; generated text is
  `tokens[prompt_length:length]`.
- `is_finished` bool []: an end-of-answer token was emitted, or the context is full.
  A finished row emits no more tokens.

A batch of rows (particles) is an `LMState` whose leaves carry a leading axis; resampling
gathers it like any pytree: `jax.tree.map(lambda x: x[ancestors], states)`.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp

from .._distribution import is_concrete
from .._errors import ArgumentError
from ._transformer import KVCache, Transformer

__all__ = ["LMState", "init_state", "next_token_logits", "PAD"]

PAD = -1


class LMState(eqx.Module):
    """One row's tokens, its KV cache and where it stands (see the module docstring).

    Fields:
      tokens:        int32 [S] the sequence so far, `PAD` (-1) from `length` on.
      length:        int32 [] number of tokens in `tokens`.
      cache:         `KVCache` of the tokens at positions 0..length-2.
      prompt_length: int32 [] length of the prompt.
      is_finished:   bool [] no more tokens (end of answer emitted, or context full).
    """

    tokens: jax.Array
    length: jax.Array
    cache: KVCache
    prompt_length: jax.Array
    is_finished: jax.Array

    @property
    def cache_size(self) -> int:
        return self.tokens.shape[-1]


def init_state(model: Transformer, prompt, cache_size: int, prompt_length=None) -> LMState:
    """Run the prompt through `model` (one parallel pass) and return the row's `LMState`.

    `prompt` is int32 [P] (P static, P < cache_size); `prompt_length` (default P; may be
    traced, 1 <= prompt_length <= P) says how many of its tokens are real, the rest being
    padding, so prompts of different lengths can share one shape and be `jax.vmap`ped:
    each row then sits at its own length. The cache gets keys and values of positions
    0..P-1 (those past prompt_length - 2 are overwritten as the row goes on).

    Errors (`ArgumentError`): a prompt that leaves no room in the context (P or
    prompt_length >= cache_size, both numbers named), an empty prompt, a cache larger
    than the model's `max_position_embeddings`.

    >>> from ppl.lm import Transformer, TransformerConfig
    >>> cfg = TransformerConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
    ...                         num_heads=4, num_kv_heads=2)
    >>> state = init_state(Transformer.random(jax.random.key(0), cfg), jnp.array([3, 4, 5]), 32)
    >>> state.tokens.shape, int(state.length), state.cache.keys.shape
    ((32,), 3, (2, 32, 2, 4))
    """
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ArgumentError(
            f"init_state: the prompt must be a 1-d integer array of token ids, got {prompt.dtype}{list(prompt.shape)}; "
            "for a batch of prompts, jax.vmap over init_state with a prompt_length per row.")
    check_context(prompt.shape[0], cache_size, model, "init_state")
    if prompt_length is None:
        prompt_length = prompt.shape[0]
    if is_concrete(prompt_length):
        n = int(prompt_length)
        if not 1 <= n <= prompt.shape[0]:
            raise ArgumentError(f"init_state: prompt_length must lie in [1, {prompt.shape[0]}] (the prompt's size), got {n}.")
    length = jnp.asarray(prompt_length, jnp.int32)
    index = jnp.arange(cache_size, dtype=jnp.int32)
    padded = jnp.full((cache_size,), PAD, jnp.int32).at[: prompt.shape[0]].set(prompt.astype(jnp.int32))
    return _prefill(model, jnp.where(index < length, padded, PAD), length, prompt.shape[0])


@functools.partial(jax.jit, static_argnums=3)
def _prefill(model: Transformer, tokens, length, num_prompt: int) -> LMState:
    positions = jnp.arange(num_prompt, dtype=jnp.int32)
    _, cache = model.forward(tokens[:num_prompt], positions, model.init_cache(tokens.shape[0]))
    return LMState(tokens, length, cache, length, jnp.zeros((), bool))


@jax.jit
def next_token_logits(model: Transformer, state: LMState):
    """Logits [V] (float32) of the token after `state.tokens[:length]`, and the state with the
    pending token's keys and values written (same tokens and length).

    One token through the model at the row's own position `length - 1`, attending to the
    cache: the decoding step that a batch of rows runs under `jax.vmap`.
    """
    position = state.length - 1
    hidden, cache = model.forward(state.tokens[position][None], position[None], state.cache)
    return model.logits(hidden[0]), LMState(state.tokens, state.length, cache, state.prompt_length, state.is_finished)


def check_context(num_tokens: int, cache_size: int, model: Transformer, where: str) -> None:
    """A prompt of `num_tokens` must leave room for one generated token in `cache_size`."""
    if not isinstance(cache_size, int) or cache_size < 2:
        raise ArgumentError(f"{where}: cache_size must be an int >= 2 (the context length in tokens), got {cache_size!r}.")
    limit = model.config.max_position_embeddings
    if cache_size > limit:
        raise ArgumentError(
            f"{where}: cache_size {cache_size} exceeds the model's context of {limit} positions "
            "(max_position_embeddings); use a smaller cache_size.")
    if num_tokens < 1:
        raise ArgumentError(f"{where}: the prompt is empty; it needs at least one token (e.g. a BOS token).")
    if num_tokens >= cache_size:
        raise ArgumentError(
            f"{where}: the prompt has {num_tokens} tokens, but the context holds {cache_size} (cache_size), and "
            f"at least one position must be left to generate. Shorten the prompt or use cache_size > {num_tokens}.")
