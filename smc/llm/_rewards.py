"""Process reward models as pairs of pure functions, for `ppl.reward` inside a reasoning step.

A `ProcessReward` scores a partial solution after each step: `init(problem, state)`
gives its own state (carried in the scan's carry beside the language model's), and
`score(aux, state, tokens, x) -> (reward, aux)` the reward in (0, 1] of the whole prefix
`state.tokens[:state.length]` just extended by the step `tokens`, with `x` the step's
input (the expected step, for a checker). Both are written for one particle and run
under `jax.vmap` inside the jitted filter.

- `flat_reward()`: reward 1 everywhere (the filter then samples the LM's own solutions).
- `step_checker(fp, fn, low)`: the programmatic verifier: each step compared with the
  expected one, a running "all correct so far" flag, and a deterministic, hackable noise.
- `learned_prm(model)`: the learned PRM, P(Y) / (P(Y) + P(N)) after "?", with its own KV
  cache carried between steps (or recomputed over the whole sequence, `cached=False`).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from ppl import ArgumentError
from ppl.lm import KVCache, LMState, Transformer

from . import _task as task

__all__ = ["ProcessReward", "flat_reward", "step_checker", "learned_prm", "stateless"]


class ProcessReward(NamedTuple):
    """A process reward model: `init(problem, state) -> aux`, `score(aux, state, tokens, x)
    -> (reward [], aux)`, reward in (0, 1], for one particle. `problem` is one row of a
    `ProblemBatch`; `state` the particle's `LMState` after the step; `tokens` [L] the step
    (-1 padded); `x` the step's row of `problem.expected`. `name` labels results."""

    init: Callable
    score: Callable
    name: str = "reward"


def stateless(fn: Callable, name: str = "reward") -> ProcessReward:
    """A `ProcessReward` of a function `fn(state, tokens, x) -> reward` with no state of its own.

    >>> r = stateless(lambda state, tokens, x: jnp.float32(0.5))
    >>> float(r.score(r.init(None, None), None, None, None)[0])
    0.5
    """
    return ProcessReward(lambda problem, state: (), lambda aux, state, tokens, x: (fn(state, tokens, x), aux), name)


@functools.lru_cache(maxsize=None)
def flat_reward() -> ProcessReward:
    """Reward 1 for every prefix: no information, every weight increment 0 under the log link."""
    return stateless(lambda state, tokens, x: jnp.ones((), jnp.float32), "flat")


@functools.lru_cache(maxsize=None)
def step_checker(fp: float = 0.0, fn: float = 0.0, low: float = 0.05, salt: int = 0) -> ProcessReward:
    """The programmatic PRM: reward 1 if the verdict is "every step so far is right", else `low`.

    The truth is exact: the step's tokens are compared with the expected step (`x`, a row
    of `task.expected_steps`), and a flag "all correct so far" is carried. The verdict is
    the flag flipped by a deterministic noise: a hash of (problem id, the step's tokens,
    `salt`) gives u ~ U(0, 1) and the verdict flips when u < fn (a right prefix judged
    wrong) or u < fp (a wrong prefix judged right). So the verifier is imperfect in a
    calibrated way (false-positive rate fp, false-negative rate fn over steps) and
    hackable: the same wrong step always passes for the same problem, so a search that
    finds it keeps it. With fp = fn = 0 it is the perfect verifier. The same arguments
    give the same object (so jitted methods compile once).

    >>> from smc.llm import encode_problems
    >>> r = step_checker()
    >>> problem = encode_problems(task.sample_problems(0, 1))[0]
    >>> aux = r.init(problem, None)
    >>> right, wrong = problem.expected[0], problem.expected[0].at[0].set(1)
    >>> [round(float(r.score(aux, None, s, problem.expected[0])[0]), 4) for s in (right, wrong)]
    [1.0, 0.05]
    """
    for name, v in (("fp", fp), ("fn", fn)):
        if not 0.0 <= float(v) <= 1.0:
            raise ArgumentError(f"step_checker: {name} is a probability in [0, 1], got {v!r}.")
    if not 0.0 < float(low) <= 1.0:
        raise ArgumentError(f"step_checker: low is the reward of a rejected prefix, in (0, 1], got {low!r}.")
    fp, fn, low = float(fp), float(fn), float(low)

    def init(problem, state):
        return jnp.ones((), bool), jnp.asarray(problem.problem_id, jnp.int32)

    def score(aux, state, tokens, x):
        is_right, problem_id = aux
        is_right = is_right & task.step_correct(tokens, x)
        u = jax.random.uniform(_hash_key(salt, problem_id, tokens))
        flip = jnp.where(is_right, u < fn, u < fp)
        verdict = is_right ^ flip
        return jnp.where(verdict, 1.0, low).astype(jnp.float32), (is_right, problem_id)

    return ProcessReward(init, score, f"checker(fp={fp:g},fn={fn:g})")


def learned_prm(model: Transformer, *, cached: bool = True, question: int | None = None,
                yes: int | None = None, no: int | None = None) -> ProcessReward:
    """The learned PRM: P(yes) / (P(yes) + P(no)) of the token after `question` appended to the prefix.

    `model` is a `Transformer` trained to answer "Y" or "N" after "?" (the built-in task's
    token ids by default). With `cached=True` (default) the PRM keeps its own KV cache
    in the carry: `init` runs the prompt through it once, and each step runs only the
    step's tokens and the "?" (L + 1 positions, the "?" overwritten by the next step's
    first token); `cached=False` recomputes the whole sequence (S positions) every step,
    with no state. Both give the same reward up to float rounding; on the built-in task
    the cached form makes a whole particle filter 1.8-2x faster (16 problems, N = 16 and
    64, 2-core CPU: 0.20 s vs 0.40 s, 0.76 s vs 1.38 s) for 41 KB more carry per particle.
    """
    if not isinstance(model, Transformer):
        raise ArgumentError(f"learned_prm: model must be a ppl.lm.Transformer, got {type(model).__name__}.")
    question = task.VOCAB.index("?") if question is None else int(question)
    yes = task.VOCAB.index("Y") if yes is None else int(yes)
    no = task.VOCAB.index("N") if no is None else int(no)

    def verdict(hidden):
        logits = model.logits(hidden)
        return jax.nn.sigmoid(logits[yes] - logits[no])

    if not cached:
        def recompute(state: LMState, tokens, x):
            size = state.tokens.shape[-1]
            seq = state.tokens.at[state.length].set(question, mode="drop")
            hidden, _ = model.forward(seq, jnp.arange(size, dtype=jnp.int32), None)
            return verdict(hidden[jnp.minimum(state.length, size - 1)])

        return stateless(recompute, "learned")

    def init(problem, state: LMState):
        size = state.tokens.shape[-1]
        num_prompt = problem.prompt.shape[-1]
        positions = jnp.arange(num_prompt, dtype=jnp.int32)
        _, cache = model.forward(state.tokens[:num_prompt], positions, model.init_cache(size))
        return cache, state.prompt_length  # the cache holds positions 0..prompt_length-1

    def score(aux, state: LMState, tokens, x):
        cache, start = aux
        size = state.tokens.shape[-1]
        positions = start + jnp.arange(tokens.shape[-1] + 1, dtype=jnp.int32)
        seq = state.tokens[jnp.minimum(positions, size - 1)]
        seq = jnp.where(positions == state.length, question, jnp.where(positions < state.length, seq, -1))
        hidden, cache = model.forward(seq, positions, cache)
        r = verdict(hidden[jnp.clip(state.length - start, 0, tokens.shape[-1])])
        return r, (KVCache(*cache), state.length)

    return ProcessReward(init, score, "learned")


def _hash_key(salt: int, problem_id, tokens):
    """A key from (salt, problem id, tokens): an FNV-1a style fold of the tokens, then one fold_in."""
    h = jnp.uint32(2166136261)
    for t in range(tokens.shape[-1]):
        h = (h ^ (tokens[t] + 2).astype(jnp.uint32)) * jnp.uint32(16777619)
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(salt), problem_id), h)
