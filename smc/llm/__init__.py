"""smc.llm: inference-time scaling of a language model by particle methods.

A reasoning process is a state-space model: each step samples one reasoning step
from the language model (`ppl.lm.lm_step`) and weights it by a process reward model
through `ppl.reward` (`reasoning_model`). Particle filtering is `smc.particle_filter` on
it; the baselines (best-of-N, weighted majority vote, self-consistency, beam search,
particle Gibbs) run on the same model at the same budget and return one `SearchResult`.

- Task and models: `task` (the built-in arithmetic task), `builtin()` (its trained
  policy and learned PRM), `encode_problems` -> `ProblemBatch`.
- Rewards: `ProcessReward` (`init`, `score` pure functions), `flat_reward`,
  `step_checker` (programmatic, with calibrated deterministic noise), `learned_prm`,
  `stateless`.
- Model: `reasoning_model`, `ReasoningCarry`, `init_carry`, `is_finished`;
  `population_step` (a policy step that batches problems x particles as one set of rows).
- Methods: `particle_filtering`, `its_hub_particle_filtering`, `best_of_n`,
  `self_consistency`, `beam_search`, `particle_gibbs`; `SearchResult`,
  `select_answer`, `answers_from_tokens`, `top_k_resampler`.
"""

from . import _task as task
from ._builtin import BUILTIN_FOLDER, Builtin, ProblemBatch, builtin, encode_problems
from ._methods import (SearchResult, answers_from_tokens, beam_search, best_of_n, its_hub_particle_filtering,
                       particle_filtering, particle_gibbs, select_answer, self_consistency, top_k_resampler)
from ._model import WEIGHTINGS, ReasoningCarry, init_carry, is_finished, reasoning_model
from ._population import PopulationStep, population_step
from ._rewards import ProcessReward, flat_reward, learned_prm, stateless, step_checker

__all__ = [
    "task", "builtin", "Builtin", "BUILTIN_FOLDER", "ProblemBatch", "encode_problems",
    "ProcessReward", "flat_reward", "step_checker", "learned_prm", "stateless",
    "reasoning_model", "ReasoningCarry", "init_carry", "is_finished", "WEIGHTINGS", "population_step", "PopulationStep",
    "SearchResult", "particle_filtering", "its_hub_particle_filtering", "best_of_n", "self_consistency",
    "beam_search", "particle_gibbs", "select_answer", "answers_from_tokens", "top_k_resampler",
]
