"""The reasoning process as a state-space model: one LM step, then a reward factor.

`reasoning_model(step, reward, num_steps, beta=1.0, link="log", weighting="ratio")` is a
`ppl.scan` over `num_steps` steps of the kernel

    carry = ReasoningCarry(lm, reward, aux)          x_t = the step's expected tokens
    lm, tokens = ppl.sample("step", step, carry.lm)   # one reasoning step of the LM
    r_t, aux   = reward.score(carry.aux, lm, tokens, x_t)   # PRM of the whole prefix
    ppl.reward("prm", ..., r_t, beta=beta, link=link)       # + beta * link(r_t)
    ppl.factor("prm_baseline", -beta * link(b_t))           # - beta * link(b_t)

so a step's log weight increment is beta * (link(r_t) - link(b_t)). The baseline b_t
says what a weight means (`weighting`):

- "ratio" (default): b_t = r_{t-1}. The increments telescope: a particle's weight since
  the start is beta * link(r_t), the PRM score of its current prefix, however many
  steps it took; the filter targets p(steps_1..t) exp(beta link(r_t)) at step t, a
  proper sequence of twisted targets (beta = 1, log link: p(prefix) * r(prefix)).
- "product": b_t = neutral (r = 1 for the log link, 1/2 for logit) while running: the
  weight accumulates every step's reward, target p * prod_t r_t^beta.
- "current": b_t = neutral always, finished particles included: each step's increment
  is beta * link(r_t) and a finished particle re-adds its final reward. With resampling
  before every step (weights reset to uniform) the resampling weight is exactly
  beta * link(r_t) of the current prefix and a finished particle competes with its final
  weight: its_hub's particle filtering and beam search.

A finished particle (its LM state is finished: the answer was emitted) takes an empty
LM step (log probability 0); its reward and reward state are frozen, so under "ratio"
and "product" it adds nothing and keeps its carry, as `smc.particle_filter(...,
is_finished=...)` requires (pass `is_finished=is_finished`).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

import ppl
from ppl import ArgumentError
from ppl.lm import LMState, LMStep, init_state

from ._rewards import ProcessReward

__all__ = ["ReasoningCarry", "reasoning_model", "init_carry", "is_finished", "WEIGHTINGS"]

WEIGHTINGS = ("ratio", "product", "current")
_EPS = float(jnp.finfo(jnp.float32).eps)


class ReasoningCarry(NamedTuple):
    """One particle's carry: its `LMState`, the reward of its prefix so far (`reward` [],
    the neutral value before any step), and the reward model's own state `aux`."""

    lm: LMState
    reward: jax.Array
    aux: Any


def is_finished(carry: ReasoningCarry) -> jax.Array:
    """Whether a particle has emitted its answer (for `particle_filter(is_finished=...)`)."""
    return carry.lm.is_finished


def _link(link: str):
    if link == "log":
        return jnp.log
    return lambda r: jnp.log(jnp.clip(r, _EPS, 1 - _EPS)) - jnp.log1p(-jnp.clip(r, _EPS, 1 - _EPS))


def neutral(link: str) -> float:
    """The reward whose link is 0: 1 for "log", 1/2 for "logit"."""
    return 1.0 if link == "log" else 0.5


def _check(beta, link, weighting):
    if link not in ("log", "logit"):
        raise ArgumentError(f"reasoning_model: link must be 'log' or 'logit' (as ppl.reward), got {link!r}.")
    if weighting not in WEIGHTINGS:
        raise ArgumentError(f"reasoning_model: weighting must be one of {WEIGHTINGS}, got {weighting!r}.")


@functools.lru_cache(maxsize=None)
def reasoning_model(step: LMStep, reward: ProcessReward, num_steps: int, beta: float = 1.0, link: str = "log",
                    weighting: str = "ratio") -> ppl.ScanGF:
    """The reasoning process over `num_steps` steps (see the module docstring).

    Called with args `(init_carry(...), expected)`, `expected` int32 [T, L] the per-step
    inputs. Choices: "step" [T, L] (the tokens). Values: `trace["prm"]` [T] the reward
    of each prefix (frozen once finished). Cached: the same arguments give the same
    model object (so jitted programs are shared).

    >>> from smc.llm import builtin, encode_problems, flat_reward, init_carry
    >>> b = builtin()
    >>> model = reasoning_model(b.step, flat_reward(), 6)
    >>> problem = encode_problems(b.task.sample_problems(0, 1))[0]
    >>> tr = model.simulate(jax.random.key(0), (init_carry(b.step, flat_reward(), problem), problem.expected))
    >>> tr["step"].shape, tr["prm"].shape
    ((6, 10), (6,))
    """
    if not isinstance(step, LMStep):
        raise ArgumentError(f"reasoning_model: step must be a ppl.lm.LMStep (ppl.lm.lm_step(...)), got "
                            f"{type(step).__name__}.")
    if not isinstance(reward, ProcessReward):
        raise ArgumentError(f"reasoning_model: reward must be a smc.llm.ProcessReward, got {type(reward).__name__}.")
    _check(beta, link, weighting)
    fn, base = _link(link), neutral(link)

    @ppl.gen
    def reason(carry: ReasoningCarry, x):
        was_finished = carry.lm.is_finished
        lm, tokens = ppl.sample("step", step, carry.lm)
        r_new, aux_new = reward.score(carry.aux, lm, tokens, x)
        r = jnp.where(was_finished, carry.reward, jnp.asarray(r_new, jnp.float32))
        aux = jax.tree.map(lambda old, new: jnp.where(was_finished, old, new), carry.aux, aux_new)
        ppl.reward("prm", _identity, r, beta=beta, link=link)
        if weighting == "ratio":
            baseline = carry.reward
        elif weighting == "product":
            baseline = jnp.where(was_finished, r, base)
        else:
            baseline = jnp.full_like(r, base)
        ppl.factor("prm_baseline", -beta * fn(baseline))
        return ReasoningCarry(lm, r, aux), tokens

    reason.__name__ = f"reason[{reward.name}, {weighting}, {link}]"
    return ppl.scan(reason, length=num_steps)


def _identity(r):
    return r


def init_carry(step: LMStep, reward: ProcessReward, problem, cache_size: int = 80, link: str = "log"
               ) -> ReasoningCarry:
    """The carry before the first step for one problem (a row of a `ProblemBatch`): the
    prompt run through the policy (`init_state`) and through the reward model (`init`)."""
    state = init_state(step.model, problem.prompt, cache_size, prompt_length=problem.prompt_length)
    return ReasoningCarry(state, jnp.full((), neutral(link), jnp.float32), reward.init(problem, state))
