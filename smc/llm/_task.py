"""The built-in reasoning task: arithmetic chains solved one line per step.

A problem is a start number and a few operations; the solution applies them one line at
a time and ends with the answer:

    Q: 7 +5 *3 -4            (the prompt, ending in a newline)
    7+5=12                   (step 1)
    12*3=36                  (step 2)
    36-4=32                  (step 3)
    A: 32$                   (the answer step; "$" ends the answer)

Text is tokenized one character per token (`VOCAB`); a step ends at a newline (the step
delimiter) or at "$" (end of answer). Everything here is deterministic from a seed.
The checkers come in two forms: in Python on text (`check_solution`, `step_labels`),
and in JAX on token arrays (`expected_steps` + `step_correct`), which is what a reward
inside a jitted particle filter uses.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

__all__ = [
    "VOCAB", "STEP_DELIMITER", "END_OF_ANSWER", "MAX_STEP_LEN", "Problem", "sample_problems",
    "prompt_text", "solution_steps", "encode", "decode", "extract_answer", "check_solution",
    "step_labels", "expected_steps", "make_tokenizer",
]

# One character per token. "?" asks the learned reward model for its verdict, "Y"/"N"
# are its answers; "#" pads training batches (never generated).
VOCAB = "#0123456789+-*=:QA ?YN\n$"
STEP_DELIMITER = "\n"
END_OF_ANSWER = "$"
MAX_STEP_LEN = 10  # "98-9=89\n" is 8 characters; "A: 99$" 6
MAX_VALUE = 99
_ID = {c: i for i, c in enumerate(VOCAB)}


class Problem(NamedTuple):
    start: int
    ops: tuple  # ((op, operand), ...) with op in "+-*"

    @property
    def answer(self) -> int:
        value = self.start
        for op, b in self.ops:
            value = _apply(value, op, b)
        return value


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def sample_problems(seed: int, n: int, num_ops=(2, 3, 4)) -> list[Problem]:
    """`n` problems from numpy's generator at `seed`: start in [2, 30], 2 to 4 operations
    with operands in [2, 9]; an operation that would leave [0, 99] is replaced by one
    that stays inside, so every intermediate value has at most two digits."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        value = int(rng.integers(2, 31))
        start, ops = value, []
        for _ in range(int(rng.choice(num_ops))):
            op, b = "+-*"[int(rng.integers(0, 3))], int(rng.integers(2, 10))
            if not 0 <= _apply(value, op, b) <= MAX_VALUE:
                op = "-" if value + b > MAX_VALUE else "+"
            value = _apply(value, op, b)
            ops.append((op, b))
        out.append(Problem(start, tuple(ops)))
    return out


def prompt_text(p: Problem) -> str:
    return "Q: " + str(p.start) + "".join(f" {op}{b}" for op, b in p.ops) + STEP_DELIMITER


def solution_steps(p: Problem) -> list[str]:
    """The correct steps, each with its delimiter: the operation lines, then the answer."""
    steps, value = [], p.start
    for op, b in p.ops:
        new = _apply(value, op, b)
        steps.append(f"{value}{op}{b}={new}{STEP_DELIMITER}")
        value = new
    steps.append(f"A: {value}{END_OF_ANSWER}")
    return steps


def encode(text: str) -> np.ndarray:
    try:
        return np.asarray([_ID[c] for c in text], np.int32)
    except KeyError as e:
        raise ValueError(f"character {e.args[0]!r} is not in the task's vocabulary {VOCAB!r}") from None


def decode(ids) -> str:
    return "".join(VOCAB[int(i)] for i in np.asarray(ids).reshape(-1) if 0 <= int(i) < len(VOCAB))


_ANSWER = re.compile(r"A: (\d+)\$")


def extract_answer(text: str) -> int | None:
    """The number after "A: " in a finished solution, or None."""
    m = _ANSWER.search(text)
    return int(m.group(1)) if m else None


def check_solution(p: Problem, text: str) -> bool:
    """Whether a generated solution's answer is the problem's answer."""
    return extract_answer(text) == p.answer


def step_labels(p: Problem, steps: list[str]) -> list[bool]:
    """For each prefix of `steps`: whether every step so far is the correct one."""
    truth, ok, out = solution_steps(p), True, []
    for i, s in enumerate(steps):
        ok = ok and i < len(truth) and s == truth[i]
        out.append(ok)
    return out


def expected_steps(p: Problem, num_steps: int) -> np.ndarray:
    """int32 [num_steps, MAX_STEP_LEN]: the correct steps' tokens, -1 padded; steps past
    the answer are all -1 (a finished solution takes empty steps)."""
    out = np.full((num_steps, MAX_STEP_LEN), -1, np.int32)
    for i, s in enumerate(solution_steps(p)[:num_steps]):
        ids = encode(s)
        out[i, : len(ids)] = ids
    return out


def step_correct(tokens, expected):
    """JAX: whether a step's tokens [L] (-1 padded) equal the expected step [L]."""
    return jnp.all(jnp.asarray(tokens) == jnp.asarray(expected))


def make_tokenizer():
    """The task's character tokenizer as a `tokenizers.Tokenizer` (saved as tokenizer.json
    beside the built-in checkpoints, so `ppl.lm.load` reads it like any other)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(VOCAB)}, unk_token="#"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok
