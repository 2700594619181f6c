"""The built-in policy and reward model of the arithmetic task, and problems as arrays.

`builtin()` loads the two checkpoints shipped in `smc/llm/builtin/` (trained by
`python -m smc.llm.train`): a tiny character-level policy that solves a problem right
30-50% of the time from one sample, and a learned process reward model (PRM) of the
same architecture. `encode_problems` turns task problems into a `ProblemBatch` of
static-shape arrays that the jitted methods vmap over.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ppl import ArgumentError
from ppl.lm import LanguageModel, LMStep, lm_step, load

from . import _task as task
from .train import CACHE_SIZE, NUM_STEPS, PROMPT_LEN

__all__ = ["Builtin", "builtin", "ProblemBatch", "encode_problems", "BUILTIN_FOLDER"]

BUILTIN_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "builtin")


class Builtin(NamedTuple):
    """The built-in task's models.

    Fields:
      policy:  `ppl.lm.LanguageModel` (model, tokenizer, end-of-answer ids) of the policy.
      prm:     `ppl.lm.LanguageModel` of the learned process reward model: the score of a
               partial solution is P("Y") / (P("Y") + P("N")) of the token after "?".
      step:    the policy's reasoning step, `lm_step(policy.model, MAX_STEP_LEN,
               stop_tokens=("\\n",), eos_tokens=("$",))` at temperature 1.
      task:    the task module (`sample_problems`, `prompt_text`, `check_solution`, ...).
      tokenizer: (property) the character tokenizer, `policy.tokenizer`.
      cache_size, num_steps: the context length and the number of reasoning steps the
               checkpoints were trained for (80 and 6).
    """

    policy: LanguageModel
    prm: LanguageModel
    step: LMStep
    task: object
    cache_size: int = CACHE_SIZE
    num_steps: int = NUM_STEPS

    @property
    def tokenizer(self):
        """The task's character tokenizer (`ppl.lm.Tokenizer`, shared by policy and PRM)."""
        return self.policy.tokenizer


def builtin(folder: str | None = None) -> Builtin:
    """Load the built-in policy and PRM (from `folder`, default the package's `builtin/`).

    Loaded once per folder (cached), so every call returns the same models and jitted
    programs are shared.

    >>> b = builtin()
    >>> b.step.max_step_len, b.policy.decode(b.policy.encode("Q: 7 +5\\n"))
    (10, 'Q: 7 +5\\n')
    """
    return _load(os.path.abspath(folder or BUILTIN_FOLDER))


@functools.lru_cache(maxsize=None)
def _load(folder: str) -> Builtin:
    paths = [os.path.join(folder, role) for role in ("policy", "prm")]
    missing = [p for p in paths if not os.path.exists(os.path.join(p, "model.safetensors"))]
    if missing:
        raise ArgumentError(
            f"smc.llm.builtin: no checkpoint at {', '.join(missing)}. The built-in weights ship with the "
            "package; to rebuild them run `python -m smc.llm.train` (about 5 minutes on a CPU), or pass "
            "folder= to a folder that `python -m smc.llm.train --out FOLDER` wrote.")
    policy, prm = (load(p) for p in paths)
    step = lm_step(policy.model, task.MAX_STEP_LEN, stop_tokens=(task.VOCAB.index(task.STEP_DELIMITER),),
                   eos_tokens=(task.VOCAB.index(task.END_OF_ANSWER),))
    return Builtin(policy, prm, step, task)


class ProblemBatch(NamedTuple):
    """B problems as arrays (a leading axis B on every field; one problem without it).

    Fields:
      prompt:         int32 [B, PROMPT_LEN] the prompt's tokens, -1 padded.
      prompt_length:  int32 [B] its real length.
      expected:       int32 [B, T, MAX_STEP_LEN] the correct steps (`task.expected_steps`);
                      the reasoning model's per-step input x_t (a programmatic checker reads
                      it; a learned PRM ignores it).
      problem_id:     int32 [B] an id per problem (seeds a checker's deterministic noise).
      answer:         int32 [B] the true answer (for scoring a method, never for searching).
    """

    prompt: jax.Array
    prompt_length: jax.Array
    expected: jax.Array
    problem_id: jax.Array
    answer: jax.Array

    @property
    def num_problems(self) -> int:
        return self.prompt.shape[0]

    def __getitem__(self, index) -> ProblemBatch:
        return ProblemBatch(*(jnp.asarray(f)[index] for f in self))


def encode_problems(problems, num_steps: int = NUM_STEPS, prompt_len: int = PROMPT_LEN,
                    problem_ids=None) -> ProblemBatch:
    """A `ProblemBatch` of task problems (ids 0..B-1 unless given).

    >>> batch = encode_problems(task.sample_problems(0, 3))
    >>> batch.prompt.shape, batch.expected.shape
    ((3, 20), (3, 6, 10))
    """
    problems = list(problems)
    prompts = np.full((len(problems), prompt_len), -1, np.int32)
    lengths = np.zeros(len(problems), np.int32)
    for i, p in enumerate(problems):
        ids = task.encode(task.prompt_text(p))
        if len(ids) > prompt_len:
            raise ArgumentError(f"encode_problems: problem {i}'s prompt has {len(ids)} tokens, more than "
                                f"prompt_len={prompt_len}.")
        prompts[i, : len(ids)] = ids
        lengths[i] = len(ids)
    expected = np.stack([task.expected_steps(p, num_steps) for p in problems])
    ids = np.arange(len(problems), dtype=np.int32) if problem_ids is None else np.asarray(problem_ids, np.int32)
    answers = np.asarray([p.answer for p in problems], np.int32)
    return ProblemBatch(jnp.asarray(prompts), jnp.asarray(lengths), jnp.asarray(expected), jnp.asarray(ids),
                        jnp.asarray(answers))
