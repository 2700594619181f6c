"""The built-in arithmetic reasoning task and its shipped checkpoints."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smc.llm import _task as task

BUILTIN = os.path.join(os.path.dirname(task.__file__), "builtin")


def test_problems_are_deterministic_and_in_range():
    a, b = task.sample_problems(3, 50), task.sample_problems(3, 50)
    assert a == b and a != task.sample_problems(4, 50)
    for p in task.sample_problems(5, 2000):
        value = p.start
        for op, operand in p.ops:
            value = {"+": value + operand, "-": value - operand, "*": value * operand}[op]
            assert 0 <= value <= task.MAX_VALUE
        assert value == p.answer
        assert 2 <= len(p.ops) <= 4


def test_solution_text_and_checks():
    p = task.Problem(7, (("+", 5), ("*", 3), ("-", 4)))
    assert task.prompt_text(p) == "Q: 7 +5 *3 -4\n"
    assert task.solution_steps(p) == ["7+5=12\n", "12*3=36\n", "36-4=32\n", "A: 32$"]
    assert task.check_solution(p, "".join(task.solution_steps(p)))
    assert not task.check_solution(p, "7+5=12\nA: 31$")
    assert task.extract_answer("no answer") is None
    assert task.step_labels(p, ["7+5=12\n", "12*3=35\n", "35-4=31\n"]) == [True, False, False]
    assert task.step_labels(p, task.solution_steps(p) + ["extra"]) == [True] * 4 + [False]


def test_tokens_round_trip_through_the_tokenizer():
    p = task.sample_problems(0, 1)[0]
    text = task.prompt_text(p) + "".join(task.solution_steps(p))
    ids = task.encode(text)
    assert task.decode(ids) == text
    tok = task.make_tokenizer()
    assert tok.encode(text).ids == ids.tolist() and tok.decode(ids.tolist()) == text
    with pytest.raises(ValueError, match="not in the task's vocabulary"):
        task.encode("x")


def test_expected_steps_and_the_jax_checker():
    p = task.Problem(7, (("+", 5), ("*", 3)))
    exp = task.expected_steps(p, 5)
    assert exp.shape == (5, task.MAX_STEP_LEN)
    assert task.decode(exp[0]) == "7+5=12\n" and task.decode(exp[2]) == "A: 36$"
    assert (exp[3:] == -1).all()
    wrong = exp[1].copy()
    wrong[3] = task.VOCAB.index("7")
    check = jax.jit(task.step_correct)
    assert bool(check(exp[1], exp[1])) and not bool(check(wrong, exp[1]))


def test_builtin_checkpoints_load_and_are_what_the_training_script_reports():
    from ppl.lm import load

    for role in ("policy", "prm"):
        lm = load(os.path.join(BUILTIN, role))
        assert lm.model.config.vocab_size == len(task.VOCAB)
        assert lm.eos_tokens == (task.VOCAB.index("$"),)
        assert lm.tokenizer.encode("Q: 1 +2\n").tolist() == task.encode("Q: 1 +2\n").tolist()
    with open(os.path.join(BUILTIN, "policy", "config.json")) as f:
        meta = json.load(f)["ppl_task"]
    # undertrained on purpose: a single sampled solution is right 20-50% of the time
    assert 0.2 <= meta["single_sample_accuracy"] <= 0.5


def test_builtin_policy_accuracy_reproduces():
    # 200 held-out problems (seed 0; training used seeds >= 1000), one sample each: the
    # accuracy is a binomial proportion, so a fresh key lands within 4 binomial standard
    # errors of the recorded one (both estimate the same p; sd of the difference
    # sqrt(2 p (1 - p) / 200) ~ 0.045).
    from ppl.lm import load
    from smc.llm import train

    with open(os.path.join(BUILTIN, "policy", "config.json")) as f:
        recorded = json.load(f)["ppl_task"]["single_sample_accuracy"]
    policy = load(os.path.join(BUILTIN, "policy")).model
    acc = train.accuracy(jax.random.key(123), policy, task.sample_problems(0, 200))
    sd = np.sqrt(2 * recorded * (1 - recorded) / 200)
    assert abs(acc - recorded) < 4 * sd
