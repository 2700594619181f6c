"""ppl.lm: language models as generative functions.

A decoder-only transformer (`Transformer`, Llama / Qwen2 / Qwen3 blocks, in equinox)
and one *reasoning step* of it as a generative function (`lm_step`), so that a
reasoning process is a `ppl.scan` state-space model whose carry is the language model's
state and whose particles `smc.particle_filter` can move, weight and resample.

Design. The step is a `GenerativeFunction` subclass (`LMStep`), not a numpyro
distribution. A distribution's `sample` returns only its value, so the KV cache built
while drawing the tokens would be lost and recomputed; as a generative function the
step returns `(new_state, tokens)`, the new state carrying the extended cache, and its
one random choice (address `()`) is the token array. It is called like any generative
function: `ppl.sample("step", step, state)` inside a `@ppl.gen` kernel, or as a
`ppl.scan` kernel by itself (args `(state, x)`, x ignored). It composes with
`ppl.vmap`, `ppl.scan`, `jax.jit`, `jax.vmap`, and with `ppl.particle_key` (what
`smc.particle_filter` gives particle i).

Shapes (one row; a batch of rows, the particle axis, is a leading axis on every leaf):

- `LMState`: tokens int32 [S] (S = cache size, static), length int32 [], the KV cache
  `KVCache(keys, values)` each [num_layers, S, num_kv_heads, head_dim], prompt_length
  int32 [], is_finished bool []. Each row sits at its own length; the cache is written
  at per-row positions. Resampling gathers the state as any pytree.
- A step's tokens: int32 [max_step_len], the step's tokens then -1 (`PAD`). The step
  ends after a delimiter (`stop_tokens`) or an end-of-answer token (`eos_tokens`, which
  also finishes the row), after max_step_len tokens, or when the context is full. A
  finished row takes steps of no tokens with log probability 0 (masked).
- The step's log density: the sum of its tokens' log probabilities under the sampler
  (temperature, top-k, top-p; the model's own with the defaults).

Checkpoints come from a local folder in the Hugging Face layout (`load`,
`load_checkpoint`, `load_tokenizer`); nothing is downloaded.

>>> import ppl
>>> from ppl.lm import Transformer, TransformerConfig, init_state, lm_step
>>> cfg = TransformerConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
...                         num_heads=4, num_kv_heads=2)
>>> model = Transformer.random(jax.random.key(0), cfg)
>>> step = lm_step(model, max_step_len=8, stop_tokens=(1,), eos_tokens=(2,))
>>> state = init_state(model, jnp.array([3, 4, 5]), cache_size=32)
>>> tr = ppl.scan(step, length=4).simulate(jax.random.key(1), (state, None))
>>> tr[()].shape  # four steps of eight token slots
(4, 8)
"""

from ._checkpoint import LanguageModel, Tokenizer, load, load_checkpoint, load_tokenizer
from ._config import SUPPORTED_ARCHITECTURES, TransformerConfig
from ._sampling import Sampler
from ._state import PAD, LMState, init_state, next_token_logits
from ._step import LMStep, lm_step, sample_steps
from ._transformer import KVCache, Transformer

__all__ = [
    # models
    "Transformer",
    "TransformerConfig",
    "KVCache",
    # state and steps
    "LMState",
    "init_state",
    "next_token_logits",
    "lm_step",
    "LMStep",
    "sample_steps",
    "Sampler",
    "PAD",
    # checkpoints
    "load",
    "load_checkpoint",
    "load_tokenizer",
    "LanguageModel",
    "Tokenizer",
    "SUPPORTED_ARCHITECTURES",
]
