"""Inference-time scaling methods over the reasoning model, at a budget of N particles.

Every method runs one jitted program per chunk of problems and returns a `SearchResult`:
every particle's answer and final weight, the chosen answer, and the budget spent. Each
problem is one `smc.particle_filter` (or `smc.csmc`) run over `reasoning_model`, its
particles resampling among themselves; `layout` says how a chunk's problems share the
program: one after another ("per_problem", `lax.map`) or as one population of problems x
particles ("population", `jax.vmap` over problems, the policy's step drawn for every row
in one token loop by `population_step`). The filter keeps each step's choices and
rewards only (`history="choices"`), not the KV caches.

- `particle_filtering`: SMC with the PRM as likelihood ("ratio" weighting: a particle's
  weight is beta * link(PRM score of its current prefix)); the answer by weighted
  majority vote (`selection="vote"`) or by the best final weight ("argmax").
- `its_hub_particle_filtering`: its_hub's configuration, weight = logit(PRM score of the
  whole prefix), multinomial resampling before every step from the softmax of the current
  weights, finished particles keep competing with their final weight, the population
  taken when every particle has finished, answer = argmax final weight.
- `best_of_n` (aggregate "last" / "min" / "product" / "mean" of the step rewards;
  selection "argmax" = best-of-N, "vote" = weighted majority vote, "majority" =
  self-consistency): N independent solutions, no resampling.
- `beam_search`: the same filter with a deterministic top-k resampler: keep the
  `beam_width` best current prefixes, each continued by N / beam_width particles.
- `particle_gibbs`: `num_iterations` sweeps: a particle filter, then conditional SMC
  (`smc.csmc`) with a reference trajectory drawn from the previous sweep's weights; N
  particles per sweep, budget N x num_iterations.

Budget. `lm_calls` counts reasoning-step generations (a running particle asked for one
step); `tokens` the tokens those steps generated (each one single-token forward pass of
the policy with its KV cache); `prm_calls` the reward evaluations of running particles.
A conditional sweep's reference particle is rescored (one teacher-forced pass per
step), counted as a call with its tokens.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ppl import ArgumentError, InferenceError
from ppl.extend import check_count
from ppl.lm import LMStep

from .._csmc import csmc
from .._filter import _lineage, particle_filter
from . import _task as task
from ._builtin import ProblemBatch
from ._model import init_carry, is_finished, reasoning_model
from ._population import population_step
from ._rewards import ProcessReward
from .train import CACHE_SIZE, NUM_STEPS

__all__ = ["SearchResult", "particle_filtering", "its_hub_particle_filtering", "best_of_n", "self_consistency",
           "beam_search", "particle_gibbs", "top_k_resampler", "answers_from_tokens", "select_answer"]

SELECTIONS = ("vote", "argmax", "majority")
LAYOUTS = ("per_problem", "population")
# Particles (problems x particles) per jitted call with layout="population" when `chunk`
# is not given, and problems per call with layout="per_problem".
POPULATION_ROWS = 256
PER_PROBLEM_CHUNK = 50
AGGREGATES = ("last", "min", "product", "mean")


class SearchResult(NamedTuple):
    """The outcome of a method on B problems with N particles (numpy arrays).

    Fields:
      answers:      int [B, N] each final particle's answer (-1: no answer emitted).
      log_weights:  float [B, N] their normalized log weights (the selection's weights).
      answer:       int [B] the chosen answer (-1: none).
      truth:        int [B] the true answers.
      lm_calls, tokens, prm_calls: int [B] the budget spent per problem (module docstring).
      slot_calls, slot_tokens: int [B, N] the same by particle slot (slot n: the work of the
                    particle at index n at each step; without resampling, particle n's own).
      final_rewards: float [B, N] the reward of each final particle's whole solution.
      step_rewards: float [B, T, N] the reward of particle n's prefix after step t (as
                    the filter stored step t; lineages cross where it resampled).
      final_tokens: int [B, N, S] each final particle's tokens (prompt and solution).
      prompt_length: int [B].
      method:       a label.

    `accuracy`, `stderr` (binomial), `text(b, n)` (particle n's solution of problem b).
    """

    answers: np.ndarray
    log_weights: np.ndarray
    answer: np.ndarray
    truth: np.ndarray
    lm_calls: np.ndarray
    tokens: np.ndarray
    prm_calls: np.ndarray
    slot_calls: np.ndarray
    slot_tokens: np.ndarray
    final_rewards: np.ndarray
    step_rewards: np.ndarray
    final_tokens: np.ndarray
    prompt_length: np.ndarray
    method: str = ""

    @property
    def is_correct(self) -> np.ndarray:
        return self.answer == self.truth

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.is_correct))

    @property
    def stderr(self) -> float:
        p, n = self.accuracy, len(self.truth)
        return math.sqrt(max(p * (1 - p), 1e-12) / n)

    def first(self, n: int, selection: str) -> SearchResult:
        """The result of the first `n` particles alone, chosen by `selection`: for runs
        without resampling (best-of-N), where they are n independent solutions."""
        answers, log_weights = self.answers[:, :n], self.log_weights[:, :n]
        calls, tokens = self.slot_calls[:, :n], self.slot_tokens[:, :n]
        return self._replace(answers=answers, log_weights=log_weights,
                             answer=select_answer(answers, log_weights, selection), lm_calls=calls.sum(1),
                             tokens=tokens.sum(1), prm_calls=calls.sum(1), slot_calls=calls, slot_tokens=tokens,
                             final_rewards=self.final_rewards[:, :n], step_rewards=self.step_rewards[:, :, :n],
                             final_tokens=self.final_tokens[:, :n])

    def text(self, b: int, n: int) -> str:
        row = self.final_tokens[b, n]
        return task.decode(row[int(self.prompt_length[b]):])


# -- the methods ----------------------------------------------------------------------------------


def particle_filtering(key, step: LMStep, reward: ProcessReward, problems: ProblemBatch, num_particles: int, *,
                       beta: float = 1.0, link: str = "log", weighting: str = "ratio", resampling="systematic",
                       ess_threshold: float = 0.5, proposal=None, selection: str = "vote",
                       num_steps: int = NUM_STEPS, cache_size: int = CACHE_SIZE, chunk: int | None = None,
                       layout: str = "per_problem") -> SearchResult:
    """Particle filtering of the reasoning process with `reward` as likelihood.

    One `smc.particle_filter` run per problem over `reasoning_model(step, reward,
    num_steps, beta, link, weighting)` with `num_particles` particles, `resampling` and
    `ess_threshold` as in `particle_filter`, and `proposal` (a generative function
    proposing the "step" choice from `(carry, x, observations)`, or None for the LM
    itself). Finished particles keep their weight (passed as `is_finished` unless
    `weighting="current"`, whose finished particles keep adding their final reward).
    `selection`: "vote" (weighted majority vote over answers), "argmax" (the best final
    weight among answered particles), "majority" (unweighted).

    Problems are run `chunk` at a time, each chunk one jitted call, laid out by `layout`
    (every method takes both): "per_problem" (default; chunk 50) runs the chunk's
    problems one after another inside the call, particles vectorized, and a problem
    whose particles have all finished skips its remaining steps; "population" (chunk:
    about `POPULATION_ROWS` particles) makes the chunk's problems x particles one
    population, each problem resampling among its own particles and the policy drawing
    every particle's step in one token loop (`population_step`), at the price of running
    every problem for every step. On a 2-core CPU with the built-in models
    "per_problem" is the faster (the step's arithmetic dominates, and the skipped steps
    count); wider batches are what an accelerator gains from. Particle keys come from
    `key` and the problem's index, so results depend on neither `chunk` nor `layout` (up
    to float rounding, which batches of other sizes can change).

    >>> from smc.llm import builtin, encode_problems, step_checker
    >>> b = builtin()
    >>> problems = encode_problems(b.task.sample_problems(0, 2))
    >>> res = particle_filtering(jax.random.key(0), b.step, step_checker(), problems, 4)
    >>> res.answers.shape, res.answer.shape, bool(res.tokens.min() > 0)
    ((2, 4), (2,), True)
    """
    config = _Config("filter", step, reward, num_steps, _check_n(num_particles), float(beta), link, weighting,
                     resampling, float(ess_threshold), proposal, cache_size, 1, None)
    return _run(key, config, problems, selection, chunk, layout, f"pf[{weighting},{link},{selection}]")


def its_hub_particle_filtering(key, step: LMStep, reward: ProcessReward, problems: ProblemBatch,
                               num_particles: int, **kw) -> SearchResult:
    """its_hub's `ParticleFiltering`: weight = logit(PRM score of the prefix), multinomial
    resampling before every step from softmax(weights), finished particles keep their final
    weight, the answer of the particle with the largest final weight.

    The filter runs T steps; its_hub stops once every particle has finished, so the
    population is read at that step (later steps only resample finished particles)."""
    kw = {"link": "logit", "weighting": "current", "resampling": "multinomial", "ess_threshold": 1.0,
          "selection": "argmax", **kw}
    res = particle_filtering(key, step, reward, problems, num_particles, **kw)
    return res._replace(method="its_hub_pf")


def best_of_n(key, step: LMStep, reward: ProcessReward, problems: ProblemBatch, n: int, *,
              aggregate: str = "last", selection: str = "argmax", num_steps: int = NUM_STEPS,
              cache_size: int = CACHE_SIZE, chunk: int | None = None, layout: str = "per_problem") -> SearchResult:
    """N independent solutions scored by the PRM, aggregated over steps.

    Each solution's score is the `aggregate` of its step rewards r_1..r_K (K its steps):
    "last" r_K (the PRM of the whole solution), "min", "product", "mean". `selection`:
    "argmax" (best-of-N), "vote" (weighted majority vote, weights the scores),
    "majority" (self-consistency; the PRM unused).
    """
    if aggregate not in AGGREGATES:
        raise ArgumentError(f"best_of_n: aggregate must be one of {AGGREGATES}, got {aggregate!r}.")
    config = _Config("filter", step, reward, num_steps, _check_n(n), 1.0, "log", "ratio", "systematic", 0.0,
                     None, cache_size, 1, aggregate)
    return _run(key, config, problems, selection, chunk, layout, f"bon[{aggregate},{selection}]")


def self_consistency(key, step, reward, problems, n, **kw) -> SearchResult:
    """N independent solutions, the most frequent answer (`best_of_n(selection="majority")`)."""
    return best_of_n(key, step, reward, problems, n, selection="majority", **kw)._replace(method="self_consistency")


def beam_search(key, step: LMStep, reward: ProcessReward, problems: ProblemBatch, n: int, *,
                beam_width: int | None = None, link: str = "logit", **kw) -> SearchResult:
    """Beam search by the PRM: before every step keep the `beam_width` prefixes of highest
    current reward (default n // 4, at least 1), each continued by n / beam_width particles
    (its_hub's `BeamSearch`: its beam_width is the number kept). Finished solutions compete
    with their final reward; the answer is the best final one."""
    n = _check_n(n)
    width = max(1, n // 4) if beam_width is None else int(beam_width)
    if not 1 <= width <= n or n % width:
        raise ArgumentError(f"beam_search: beam_width must divide n = {n} (1 <= beam_width <= n), got {beam_width!r}.")
    kw = {"weighting": "current", "ess_threshold": 1.0, "selection": "argmax", **kw}
    res = particle_filtering(key, step, reward, problems, n, link=link, resampling=top_k_resampler(width), **kw)
    return res._replace(method="beam")


def particle_gibbs(key, step: LMStep, reward: ProcessReward, problems: ProblemBatch, num_particles: int, *,
                   num_iterations: int = 2, beta: float = 1.0, link: str = "logit", weighting: str = "current",
                   selection: str = "argmax", num_steps: int = NUM_STEPS, cache_size: int = CACHE_SIZE,
                   chunk: int | None = None, layout: str = "per_problem") -> SearchResult:
    """Particle Gibbs (its_hub's `ParticleGibbs`): a particle filter (multinomial resampling
    before every step), then `num_iterations - 1` conditional SMC sweeps (`smc.csmc`), each
    with the previous sweep's trajectory drawn by its final weights as the reference.
    Answer from the last sweep. Budget num_particles x num_iterations."""
    n = _check_n(num_particles)
    if n < 2 or int(num_iterations) < 1:
        raise ArgumentError(f"particle_gibbs: needs num_particles >= 2 (a reference and a free particle) and "
                            f"num_iterations >= 1, got {num_particles} and {num_iterations}.")
    config = _Config("gibbs", step, reward, num_steps, n, float(beta), link, weighting, "multinomial", 1.0, None,
                     cache_size, int(num_iterations), None)
    return _run(key, config, problems, selection, chunk, layout, f"pg[{num_iterations}]")


def top_k_resampler(k: int):
    """A deterministic resampler: the `k` largest weights, each repeated n / k times (beam search).

    >>> top_k_resampler(2)(None, jnp.log(jnp.array([0.1, 0.5, 0.3, 0.1])), 4)
    Array([1, 2, 1, 2], dtype=int32)
    """
    return _TopK(int(k))


class _TopK(NamedTuple):
    k: int

    def __call__(self, key, log_weights, n):
        top = jax.lax.top_k(log_weights, self.k)[1].astype(jnp.int32)
        return top[jnp.arange(n) % self.k]


# -- selection ----------------------------------------------------------------------------------


def select_answer(answers, log_weights, selection: str) -> np.ndarray:
    """The chosen answer per problem from answers [B, N] and log weights [B, N] (numpy).

    "argmax": the answer of the largest weight among particles that gave one; "vote":
    the answer with the largest total weight among particles that gave one; "majority":
    the most frequent answer (ties: the smallest). -1 when no particle answered.
    """
    if selection not in SELECTIONS:
        raise ArgumentError(f"selection must be one of {SELECTIONS}, got {selection!r}.")
    answers, log_weights = np.asarray(answers), np.asarray(log_weights, np.float64)
    if selection == "argmax":  # among the particles that gave an answer, if any did
        masked = np.where(answers >= 0, log_weights, -np.inf)
        best = np.where(np.isneginf(masked).all(axis=1), np.argmax(log_weights, axis=1), np.argmax(masked, axis=1))
        return answers[np.arange(len(answers)), best]
    out = np.full(len(answers), -1, np.int64)
    for b in range(len(answers)):
        ok = answers[b] >= 0
        if not ok.any():
            continue
        values = answers[b][ok]
        if selection == "majority":
            w = np.ones(len(values))
        else:
            lw = log_weights[b][ok]
            w = np.exp(lw - lw.max())
        uniq, inverse = np.unique(values, return_inverse=True)
        out[b] = uniq[np.argmax(np.bincount(inverse, weights=w))]
    return out


def answers_from_tokens(tokens) -> np.ndarray:
    """The answer of each token row [..., S] (numpy): the number in "A: <digits>$", -1 if none.

    Agrees with `task.extract_answer` on the decoded text for rows holding one "$".
    """
    tokens = np.asarray(tokens)
    ids = {c: task.VOCAB.index(c) for c in "A: $0"}
    is_eos = tokens == ids["$"]
    e = np.argmax(is_eos, axis=-1)
    value = np.zeros(e.shape, np.int64)
    digits = np.zeros(e.shape, np.int64)
    place = np.ones(e.shape, np.int64)
    going = is_eos.any(axis=-1)

    def at(i):
        return np.take_along_axis(tokens, np.clip(i, 0, tokens.shape[-1] - 1)[..., None], axis=-1)[..., 0]

    for k in range(1, 7):
        t = at(e - k)
        is_digit = going & (e - k >= 0) & (t >= ids["0"]) & (t <= ids["0"] + 9)
        value = value + np.where(is_digit, (t - ids["0"]) * place, 0)
        place = np.where(is_digit, place * 10, place)
        digits = digits + is_digit
        going = going & is_digit
    start = e - digits
    ok = (is_eos.any(axis=-1) & (digits > 0) & (start - 3 >= 0) & (at(start - 1) == ids[" "])
          & (at(start - 2) == ids[":"]) & (at(start - 3) == ids["A"]))
    return np.where(ok, value, -1)


# -- the runner ---------------------------------------------------------------------------------


class _Config(NamedTuple):
    kind: str  # "filter" or "gibbs"
    step: LMStep
    reward: ProcessReward
    num_steps: int
    num_particles: int
    beta: float
    link: str
    weighting: str
    resampling: Any
    ess_threshold: float
    proposal: Any
    cache_size: int
    num_iterations: int
    aggregate: str | None


def _check_n(n) -> int:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ArgumentError(f"the number of particles must be a positive int (a static shape), got {n!r}.")
    return int(n)


def _run(key, config: _Config, problems: ProblemBatch, selection: str, chunk, layout: str, label: str
         ) -> SearchResult:
    if selection not in SELECTIONS:
        raise ArgumentError(f"selection must be one of {SELECTIONS}, got {selection!r}.")
    if not isinstance(problems, ProblemBatch):
        raise ArgumentError(f"problems must be a smc.llm.ProblemBatch (smc.llm.encode_problems(...)), got "
                            f"{type(problems).__name__}.")
    num = problems.num_problems
    if layout not in LAYOUTS:
        raise ArgumentError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
    if chunk is None:
        chunk = max(1, POPULATION_ROWS // config.num_particles) if layout == "population" else PER_PROBLEM_CHUNK
    chunk = min(check_count(chunk, "chunk", "smc.llm"), num)
    parts = []
    for lo in range(0, num, chunk):
        # The last chunk is padded with copies of its last problem (dropped after), so
        # every chunk has the same shapes and one program serves them all.
        index = jnp.minimum(jnp.arange(lo, lo + chunk), num - 1)
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(index)
        parts.append(jax.device_get(_run_chunk(keys, problems[index], config, layout)))
    out = {k: np.concatenate([p[k] for p in parts])[:num] for k in parts[0]}
    _check_rewards(out["step_rewards"], out["running"], config)
    answers = answers_from_tokens(out["final_tokens"])
    log_weights = out["log_weights"]
    if config.aggregate is not None:
        log_weights = _aggregate(out["step_rewards"], out["running"], config.aggregate)
    return SearchResult(answers, log_weights, select_answer(answers, log_weights, selection),
                        np.asarray(problems.answer), out["calls"].sum(1), out["tokens"].sum(1),
                        out["calls"].sum(1), out["calls"], out["tokens"],
                        out["final_rewards"],
                        out["step_rewards"], out["final_tokens"], np.asarray(problems.prompt_length), label)


def _aggregate(rewards, running, how):
    """[B, N] log scores of each (unresampled) particle's step rewards [B, T, N] over its running steps."""
    log_r = np.log(np.clip(rewards, 1e-30, None))
    if how == "last":  # the reward stays frozen after the last step
        return log_r[:, -1]
    if how == "min":
        return np.where(running, log_r, np.inf).min(axis=1)
    if how == "product":
        return np.where(running, log_r, 0.0).sum(axis=1)
    mean = np.where(running, rewards, 0.0).sum(axis=1) / np.maximum(running.sum(axis=1), 1)
    return np.log(np.clip(mean, 1e-30, None))


def _check_rewards(rewards, running, config: _Config) -> None:
    """A reward outside (0, 1], or not finite, names its problem, step and particle."""
    bad = ~((rewards > 0) & (rewards <= 1)) & running
    if bad.any():
        b, t, i = (int(v[0]) for v in np.nonzero(bad))
        raise InferenceError(
            f"smc.llm: the reward model {config.reward.name!r} returned {float(rewards[b, t, i]):g} for problem {b}, "
            f"step {t} (counting from 0), particle {i}; a process reward must lie in (0, 1] (a probability "
            "that the prefix is right; 0 would make the particle impossible). Clip it, e.g. "
            "jnp.clip(r, 1e-6, 1.0), or fix the reward model.")


@functools.partial(jax.jit, static_argnames=("config", "layout"))
def _run_chunk(keys, problems: ProblemBatch, config: _Config, layout: str):
    if layout == "per_problem":
        # One problem after another (lax.map), particles vectorized: each problem's filter
        # keeps its own `lax.cond`s, so it stops working once its particles have finished.
        return jax.lax.map(lambda kp: _one_problem(kp[0], kp[1], config, config.step), (keys, problems))
    # One population: `jax.vmap` over problems of a filter over particles (each problem
    # resampling among its own particles), the policy's step sampled for every particle of
    # every problem in one token loop (`population_step`; a plain LMStep under two vmaps
    # would select every row's KV caches at every token). Under the vmap the filter's
    # conds become selects: every problem runs every step.
    step = population_step(config.step)
    return jax.vmap(lambda k, p: _one_problem(k, p, config, step))(keys, problems)


def _one_problem(key, problem: ProblemBatch, config: _Config, step: LMStep):
    model = reasoning_model(step, config.reward, config.num_steps, config.beta, config.link, config.weighting)
    carry = init_carry(step, config.reward, problem, config.cache_size, config.link)
    args = (carry, problem.expected)
    n = config.num_particles
    frozen = config.weighting != "current"
    # history="choices": the summary reads tokens, rewards and the genealogy only, so the
    # run keeps no step's carries (KV caches).
    result = particle_filter(key, model, args, {}, n, proposal=config.proposal, resampling=config.resampling,
                             ess_threshold=config.ess_threshold, is_finished=is_finished if frozen else None,
                             history="choices")
    summaries = [_summary(result, problem, config)]
    for sweep in range(1, config.num_iterations):
        k_ref, k_sweep = jax.random.split(jax.random.fold_in(key, sweep))
        index = jax.random.categorical(k_ref, result.log_weights)
        reference = _path_choices(result, index)
        result = csmc(k_sweep, model, args, {}, reference, n).filter
        summaries.append(_summary(result, problem, config))
    last = summaries[-1]  # answers from the last sweep, the budget of every sweep
    last["tokens"] = sum(s["tokens"] for s in summaries)
    last["calls"] = sum(s["calls"] for s in summaries)
    return last


def _path_choices(result, index):
    """The choices [T, ...] of the path that ends in final particle `index`."""
    lineage = _lineage(result.ancestors)[:, index]  # [T]
    steps = result.step_particles.choices  # [T, N, ...]
    return jax.tree.map(lambda leaf: leaf[jnp.arange(leaf.shape[0]), lineage], steps)


def _summary(result, problem: ProblemBatch, config: _Config):
    """The population to answer from and the budget spent, from one filter run.

    Reads only each step's tokens and rewards and the genealogy (no carries): a
    particle's text is the prompt and the tokens of the steps along its lineage.
    """
    steps = result.step_particles  # StepChoices or traces, [T, N, ...]
    tokens = steps["step"]  # [T, N, L]: the step's tokens, PAD after it; all PAD once finished
    running = tokens[..., 0] >= 0  # [T, N]: slot n generated a step at step t
    done = _finished_after(tokens, result.ancestors, problem.prompt_length, config)  # [T, N]
    num_steps = tokens.shape[0]
    if config.weighting == "current":  # the population when every particle had finished (its_hub stops there)
        all_done = jnp.all(done, axis=1)
        t = jnp.where(jnp.any(all_done), jnp.argmax(all_done), num_steps - 1)
    else:
        t = num_steps - 1
    prompt = result.args[0].lm.tokens  # [S] the prompt, PAD after it (the initial carry's)
    final_tokens = _texts(prompt, problem.prompt_length, tokens, result.ancestors, t)
    rewards = steps["prm"]  # [T, N] the reward of each prefix after step t (frozen once finished)
    return {"final_tokens": final_tokens, "final_rewards": rewards[t], "log_weights": result.step_log_weights[t],
            "step_rewards": rewards, "running": running, "tokens": jnp.sum(tokens >= 0, axis=(0, 2)),
            "calls": jnp.sum(running, axis=0)}


def _finished_after(tokens, ancestors, prompt_length, config: _Config):
    """[T, N] whether particle n of step t had finished after that step: it (or an
    ancestor) emitted an end-of-answer token, or its text filled the context."""
    eos = jnp.asarray(config.step.eos_tokens, jnp.int32)
    has_eos = jnp.any((tokens[..., None] == eos) & (tokens[..., None] >= 0), axis=(-2, -1))
    count = jnp.sum(tokens >= 0, axis=-1)
    n = tokens.shape[1]

    def forward(state, inputs):
        done, length = state
        parents, is_end, added = inputs
        length = length[parents] + added
        done = done[parents] | is_end | (length >= config.cache_size)
        return (done, length), done

    start = (jnp.zeros((n,), bool), jnp.broadcast_to(jnp.asarray(prompt_length, jnp.int32), (n,)))
    return jax.lax.scan(forward, start, (ancestors, has_eos, count))[1]


def _texts(prompt, prompt_length, tokens, ancestors, t):
    """[N, S] the texts of step t's particles: the prompt, then the tokens of every step
    up to t along each particle's lineage, PAD after (as its `LMState.tokens`)."""
    num_steps, n, width = tokens.shape
    size = prompt.shape[-1]
    later = jnp.arange(num_steps)[:, None] > t
    lineage = _lineage(jnp.where(later, jnp.arange(n, dtype=ancestors.dtype), ancestors))  # [T, N]
    own = tokens[jnp.arange(num_steps)[:, None], lineage]  # [T, N, L]
    own = jnp.where(later[..., None], -1, own)
    flat = jnp.moveaxis(own, 1, 0).reshape(n, num_steps * width)  # each particle's step tokens in order
    is_token = flat >= 0
    where = jnp.where(is_token, prompt_length + jnp.cumsum(is_token, axis=1) - 1, size)  # size: dropped
    rows = jnp.broadcast_to(prompt, (n, size))
    return jax.vmap(lambda row, i, v: row.at[i].set(v, mode="drop"))(rows, where, flat)

