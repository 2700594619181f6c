"""`LMStep`: one reasoning step of a language model, as a generative function.

`lm_step(model, max_step_len, stop_tokens=..., eos_tokens=...)` is a generative function
called with args `(state,)` or `(state, x)` (x is ignored, so the step is itself a
`ppl.scan` kernel) that returns `(new_state, tokens)`:

- its one random choice, at address `()`, is `tokens`: int32 [max_step_len], the step's
  tokens then `PAD` (-1). The step ends after the first token in `stop_tokens` (a step
  delimiter) or `eos_tokens` (end of answer), after `max_step_len` tokens, or when the
  context is full; the ending token belongs to the step. A finished state (see
  `LMState.is_finished`) takes a step of no tokens: all `PAD`, log probability 0.
- its density is the product over the step's tokens of the sampler's next-token
  probabilities (temperature / top-k / top-p applied, so with the defaults the model's
  own distribution); padding must be `PAD` where the rules say the step has ended,
  else the density is 0.

`simulate` draws the tokens in one `lax.while_loop` inside `jit`: each iteration runs one
token through the model with the KV cache (at the row's own position), samples, and
stops when the step ends (a batch under `jax.vmap` stops when every row has). `assess`
and `generate` with the tokens given score them in one parallel (teacher-forced) pass
over the step, which also extends the cache. So the model can be a proposal (simulate,
its score the proposal density) or be conditioned on given text (generate's weight).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .. import _keys
from .._choicemap import ChoiceMap
from .._distribution import is_concrete
from .._errors import ArgumentError, ObservationError
from .._gfi import GenerativeFunction
from .._keys import ParticleKey, particle_key
from .._trace import Trace
from ._sampling import Sampler
from ._state import PAD, LMState, next_token_logits
from ._transformer import Transformer

__all__ = ["LMStep", "lm_step", "sample_steps"]


class LMStep(GenerativeFunction):
    """One reasoning step of `model`: tokens until a delimiter, end of answer or `max_step_len`.

    Args `(state,)` or `(state, x)`; returns `(new_state, tokens)`; one choice at `()`:
    tokens int32 [max_step_len] padded with -1. See the module docstring for the density.

    Fields: `model`, `max_step_len`, `stop_tokens`, `eos_tokens` (tuples of token ids),
    `sampler` (a `Sampler`).

    `sample(key, state)` and `score(state, tokens)` are the same computations without a
    trace, for one row: `(new_state, tokens, log_prob)` and `(log_prob, new_state)`.

    Memory: a trace keeps its args and its return value, so a step's trace holds the
    state before and after the step, two KV caches. Code that keeps the traces of many
    steps (a filter's history of T steps) holds 2T caches per particle unless it keeps
    only the choices and scores.
    """

    def __init__(self, model: Transformer, max_step_len: int, stop_tokens=(), eos_tokens=(), sampler=None):
        self.model = model
        self.max_step_len = max_step_len
        self.stop_tokens = tuple(stop_tokens)
        self.eos_tokens = tuple(eos_tokens)
        self.sampler = Sampler() if sampler is None else sampler
        self.__name__ = "lm_step"

    def _parts(self):
        return (id(self.model), self.max_step_len, self.stop_tokens, self.eos_tokens, self.sampler)

    def __eq__(self, other):
        return type(other) is type(self) and other.model is self.model and other._parts() == self._parts()

    def __hash__(self):
        return hash((LMStep,) + self._parts())

    def __repr__(self):
        return (f"lm_step(max_step_len={self.max_step_len}, stop_tokens={self.stop_tokens}, "
                f"eos_tokens={self.eos_tokens}, {self.sampler})")

    def _check_arity(self, args, method):
        if len(args) not in (1, 2) or not isinstance(args[0], LMState):
            got = ", ".join(type(a).__name__ for a in args) or "nothing"
            raise ArgumentError(
                f"{self.__name__}.{method}: the step is called with args (state,) or (state, x), state an "
                f"LMState (from ppl.lm.init_state); got ({got}).")

    # -- the two computations ------------------------------------------------------------------
    def _rules(self):
        return (self.max_step_len, self.stop_tokens, self.eos_tokens, self.sampler)

    def sample(self, key, state: LMState):
        """Draw one step for one row: `(new_state, tokens [max_step_len], log_prob)`."""
        key = _keys.as_jax_key(key) if isinstance(key, ParticleKey) else key
        return _sample(self.model, key, state, self._rules())

    def score(self, state: LMState, tokens):
        """Log probability of the step `tokens` [max_step_len] from `state`, and the new state.

        One parallel pass over the step (the pending token and the step's tokens but the
        last). -inf when `tokens` is not a step these rules can produce (a token outside
        the vocabulary, padding that is not -1 or that comes too early or too late).
        """
        return _score(self.model, state, jnp.asarray(tokens).astype(jnp.int32), self._rules())

    # -- the interface ---------------------------------------------------------------------------
    def _trace(self, args, new_state, tokens, log_prob):
        return Trace(self, args, (new_state, tokens), log_prob, tokens)

    def _given(self, choices: ChoiceMap, method: str):
        if not choices.has_value:
            raise ArgumentError(
                f"{self.__name__}.{method}: the step has one choice at address (), its tokens; pass "
                "ChoiceMap.leaf(tokens), or {'step': tokens} at the address of a ppl.sample call.")
        tokens = jnp.asarray(choices[()])
        if tokens.shape != (self.max_step_len,) or not (
                jnp.issubdtype(tokens.dtype, jnp.integer) or jnp.issubdtype(tokens.dtype, jnp.floating)):
            raise ObservationError(
                f"{self.__name__}.{method}: the step's tokens must be an int32 array of shape "
                f"({self.max_step_len},) (max_step_len), padded with -1 after the step's last token; got "
                f"{tokens.dtype}{list(tokens.shape)}.")
        if is_concrete(tokens):
            host = np.asarray(tokens)
            vocab = self.model.config.vocab_size
            bad = (host < PAD) | (host >= vocab) | (host != np.round(host))
            if bad.any():
                i = int(np.argmax(bad))
                raise ObservationError(
                    f"{self.__name__}.{method}: token {host[i]:g} at index {i} is not a token id in "
                    f"[0, {vocab}) nor the padding -1.")
        return tokens.astype(jnp.int32)

    def _simulate(self, key, args):
        new_state, tokens, log_prob = self.sample(key, args[0])
        return self._trace(args, new_state, tokens, log_prob)

    def _assess(self, choices, args):
        tokens = self._given(choices, "assess")
        log_prob, new_state = self.score(args[0], tokens)
        return log_prob, (new_state, tokens)

    def _generate(self, key, constraints, args):
        if constraints.is_empty:
            return self._simulate(key, args), jnp.zeros(())
        tokens = self._given(constraints, "generate")
        log_prob, new_state = self.score(args[0], tokens)
        return self._trace(args, new_state, tokens, log_prob), log_prob

    def _update(self, key, trace, constraints, args):
        if constraints.is_empty:
            tokens, discard = trace.inner, ChoiceMap()
        else:
            tokens, discard = self._given(constraints, "update"), ChoiceMap.leaf(trace.inner)
        log_prob, new_state = self.score(args[0], tokens)
        return self._trace(args, new_state, tokens, log_prob), log_prob - trace.score, discard

    def _regenerate(self, key, trace, selection, args):
        if () in selection:
            return self._simulate(key, args), jnp.zeros(())
        log_prob, new_state = self.score(args[0], trace.inner)
        return self._trace(args, new_state, trace.inner, log_prob), log_prob - trace.score

    def _project(self, trace, selection):
        return trace.score if () in selection else jnp.zeros(())

    def _choices(self, trace):
        return ChoiceMap.leaf(trace.inner)


def lm_step(model: Transformer, max_step_len: int, *, stop_tokens=(), eos_tokens=(), temperature: float = 1.0,
            top_k: int | None = None, top_p: float = 1.0) -> LMStep:
    """The generative function of one reasoning step of `model` (see `LMStep`).

    Args:
      model: a `Transformer`.
      max_step_len: L, the most tokens one step draws (static; the choice's shape).
      stop_tokens: token ids that end a step (step delimiters, e.g. the ids of "\\n\\n").
      eos_tokens: token ids that end the answer: the row is finished after one.
      temperature: divides the logits (0: greedy).
      top_k: keep the k most likely tokens (None: all; 1: greedy).
      top_p: keep the smallest set of most likely tokens of probability >= top_p.

    >>> from ppl.lm import Transformer, TransformerConfig, init_state
    >>> cfg = TransformerConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
    ...                         num_heads=4, num_kv_heads=2)
    >>> model = Transformer.random(jax.random.key(0), cfg)
    >>> step = lm_step(model, 8, stop_tokens=(1,), eos_tokens=(2,))
    >>> state = init_state(model, jnp.array([3, 4, 5]), 32)
    >>> tr = step.simulate(jax.random.key(1), (state,))
    >>> new_state, tokens = tr.retval
    >>> tokens.shape, bool(jnp.isclose(step.assess(tr.choices, (state,))[0], tr.score))
    ((8,), True)
    """
    if not isinstance(model, Transformer):
        raise ArgumentError(f"lm_step: model must be a ppl.lm.Transformer, got {type(model).__name__}.")
    if not isinstance(max_step_len, int) or isinstance(max_step_len, bool) or max_step_len < 1:
        raise ArgumentError(f"lm_step: max_step_len must be a positive int (a static shape), got {max_step_len!r}.")
    vocab = model.config.vocab_size
    ids = {}
    for name, given in (("stop_tokens", stop_tokens), ("eos_tokens", eos_tokens)):
        given = (given,) if isinstance(given, (int, np.integer)) else tuple(given)
        bad = [t for t in given if not isinstance(t, (int, np.integer)) or not 0 <= t < vocab]
        if bad:
            raise ArgumentError(f"lm_step: {name} must be token ids in [0, {vocab}), got {bad}.")
        ids[name] = tuple(sorted({int(t) for t in given}))
    sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p)
    return LMStep(model, max_step_len, ids["stop_tokens"], ids["eos_tokens"], sampler)


def sample_steps(key, step: LMStep, states: LMState):
    """One step for each of N rows (the particle axis): `jax.vmap` of `step.sample`.

    `states` carries a leading axis N on every leaf; row i draws with
    `ppl.particle_key(key, i)` (as a particle filter's particle i does). Returns
    `(new_states, tokens [N, max_step_len], log_probs [N])`. Finished rows stay as they
    are (no tokens, log probability 0). One `while_loop`: it runs until every row's
    step has ended.
    """
    n = states.length.shape[0]
    return jax.vmap(lambda i, s: step.sample(particle_key(key, i), s))(jnp.arange(n), states)


# -- the computations, jitted once per model shape and step rules --------------------------------------


def _masks(vocab: int, stop_tokens, eos_tokens):
    is_stop = np.zeros(vocab, bool)
    is_stop[list(stop_tokens)] = True
    is_eos = np.zeros(vocab, bool)
    is_eos[list(eos_tokens)] = True
    return jnp.asarray(is_stop), jnp.asarray(is_eos)


@functools.partial(jax.jit, static_argnums=3)
def _sample(model: Transformer, key, state: LMState, rules):
    return _sampler(rules)(model, key, state)


@functools.lru_cache(maxsize=None)
def _sampler(rules):
    """The one-row sampler for `rules`, with a batching rule of its own.

    Under `jax.vmap`, a `while_loop` whose predicate differs per row selects between the
    old and the new carry of every row at every iteration: a copy of the whole KV cache
    per token (1.6x slower at S = 1024 on CPU). The rule below runs the batch in one loop
    whose predicate is "some row is still drawing" and masks finished rows inside the
    body instead: their cache writes fall past the cache (dropped), so nothing is copied.
    """

    @jax.custom_batching.custom_vmap
    def one_row(model, key, state):
        batch = jax.tree.map(lambda x: x[None], state)
        out = _sample_rows(model, key, batch, rules, model_axes=None, key_axis=None)
        return jax.tree.map(lambda x: x[0], out)

    @one_row.def_vmap
    def rows(axis_size, in_batched, model, key, state):
        model_batched, key_batched, state_batched = in_batched
        model_axes = jax.tree.map(lambda b: 0 if b else None, model_batched)
        state = jax.tree.map(lambda x, b: x if b else jnp.broadcast_to(x, (axis_size,) + x.shape),
                             state, state_batched)
        out = _sample_rows(model, key, state, rules, model_axes, 0 if key_batched else None)
        return out, jax.tree.map(lambda _: True, out)

    return one_row


def _sample_rows(model, key, states: LMState, rules, model_axes, key_axis):
    """Sample one step for each row of `states` (leading axis R) in one while loop."""
    steps, stop_tokens, eos_tokens, sampler = rules
    rows, size = states.tokens.shape
    is_stop, is_eos = _masks(model.config.vocab_size, stop_tokens, eos_tokens)

    def row_body(model, key, i, st, is_done):
        # A done row runs at position `size`: its cache write is dropped, its outputs masked.
        position = jnp.where(is_done, size, st.length - 1)
        hidden, cache = model.forward(st.tokens[jnp.minimum(position, size - 1)][None], position[None], st.cache)
        log_probs = sampler.log_probs(model.logits(hidden[0]))
        token = jax.random.categorical(jax.random.fold_in(key, i), log_probs).astype(jnp.int32)
        length = jnp.where(is_done, st.length, st.length + 1)
        tokens = jnp.where(is_done, st.tokens, st.tokens.at[st.length].set(token, mode="drop"))
        is_finished = st.is_finished | (~is_done & (is_eos[token] | (length >= size)))
        now_done = is_done | is_finished | is_stop[token] | (i + 1 >= steps)
        st = LMState(tokens, length, cache, st.prompt_length, is_finished)
        return st, jnp.where(is_done, PAD, token), jnp.where(is_done, 0.0, log_probs[token]), now_done

    step_rows = jax.vmap(row_body, in_axes=(model_axes, key_axis, None, 0, 0))

    def body(carry):
        i, st, tokens, log_prob, is_done = carry
        st, token, token_log_prob, is_done = step_rows(model, key, i, st, is_done)
        return i + 1, st, tokens.at[:, i].set(token), log_prob + token_log_prob, is_done

    start = (jnp.int32(0), states, jnp.full((rows, steps), PAD, jnp.int32), jnp.zeros((rows,), jnp.float32),
             states.is_finished | (states.length >= size))
    _, states, tokens, log_prob, _ = jax.lax.while_loop(lambda c: ~jnp.all(c[4]), body, start)
    return states, tokens, log_prob


@functools.partial(jax.jit, static_argnums=3)
def _score(model: Transformer, state: LMState, tokens, rules):
    steps, stop_tokens, eos_tokens, sampler = rules
    size, vocab = state.tokens.shape[-1], model.config.vocab_size
    is_stop, is_eos = _masks(vocab, stop_tokens, eos_tokens)
    j = jnp.arange(steps, dtype=jnp.int32)
    is_real = (tokens >= 0) & (tokens < vocab)
    safe = jnp.where(is_real, tokens, 0)
    ends = is_real & (is_stop[safe] | is_eos[safe])
    count = jnp.minimum(jnp.min(jnp.where(ends, j, steps - 1)) + 1, size - state.length)
    count = jnp.where(state.is_finished, 0, jnp.maximum(count, 0))  # the step's number of tokens
    inside = j < count
    is_valid = jnp.all(jnp.where(inside, is_real, tokens == PAD))

    inputs = jnp.concatenate([state.tokens[state.length - 1][None], safe[:-1]])
    hidden, cache = model.forward(inputs, state.length - 1 + j, state.cache)
    log_probs = sampler.log_probs(model.logits(hidden))
    token_log_probs = jnp.take_along_axis(log_probs, safe[:, None], axis=-1)[:, 0]
    log_prob = jnp.where(is_valid, jnp.sum(jnp.where(inside, token_log_probs, 0.0)), -jnp.inf)

    offset = jnp.arange(size, dtype=jnp.int32) - state.length
    placed = (offset >= 0) & (offset < count)
    new_tokens = jnp.where(placed, safe[jnp.clip(offset, 0, steps - 1)], state.tokens)
    length = state.length + count
    last = safe[jnp.maximum(count - 1, 0)]
    is_finished = state.is_finished | ((count > 0) & (is_eos[last] | (length >= size)))
    return log_prob, LMState(new_tokens, length, cache, state.prompt_length, is_finished)
