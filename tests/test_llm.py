"""smc.llm: the reasoning model, its rewards, particle filtering and the baselines.

Truths: with a flat reward the filter's answers are the language model's own (a
statistical comparison with independent samples, stated tolerance); with the perfect
programmatic verifier particle filtering is at least as accurate as best-of-N at the same
budget; budget counts equal what the particles generated; a resampled particle's state
(KV cache included) is its ancestor's and continues as it would; the weightings give the
weights they promise; bad rewards name problem, step and particle.

Shapes and seeds are fixed and shared so that each method compiles once (a compile is
most of a test's time here).
"""

import doctest
import importlib

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from jax.extend.core import jaxprs_in_params

import ppl
import smc
import smc.llm as llm
from ppl.lm import init_state
from smc.llm import task

NUM_PROBLEMS = 24
N = 8


@pytest.fixture(scope="module")
def b():
    return llm.builtin()


@pytest.fixture(scope="module")
def problems():
    return llm.encode_problems(task.sample_problems(0, NUM_PROBLEMS))


# -- a flat reward leaves the language model's distribution alone ---------------------------------


def test_flat_reward_filter_samples_the_language_model(b, problems):
    # With reward 1 every weight increment is 0: resampling before every step (multinomial,
    # uniform weights) picks ancestors uniformly, so each final particle is marginally a draw
    # of the LM. Compare the share of right answers per problem with N independent draws.
    # Resampling correlates a population's particles, so the standard error is taken over
    # the per-problem differences (clusters); 4 s.e. is a false alarm rate of ~6e-5.
    flat = llm.flat_reward()
    key = jax.random.key(11)
    pf = llm.particle_filtering(key, b.step, flat, problems, N, resampling="multinomial", ess_threshold=1.0)
    iid = llm.best_of_n(jax.random.key(12), b.step, flat, problems, N)
    assert np.all(pf.log_weights == pytest.approx(-np.log(N)))
    right_pf = (pf.answers == pf.truth[:, None]).mean(1)
    right_iid = (iid.answers == iid.truth[:, None]).mean(1)
    diff = right_pf - right_iid
    se = diff.std(ddof=1) / np.sqrt(len(diff))
    assert abs(diff.mean()) < 4 * se + 1e-9
    # the filter did resample: some populations hold copies of one solution
    texts = [[pf.text(i, j) for j in range(N)] for i in range(NUM_PROBLEMS)]
    assert any(len(set(t)) < N for t in texts)


# -- the perfect verifier: particle filtering >= best-of-N -----------------------------------------


def test_perfect_checker_filter_at_least_as_accurate_as_best_of_n(b, problems):
    # Same budget (N particles, about the same tokens). The margin is 2 binomial s.e. of the
    # difference of the two accuracies (one-sided false alarm ~2% if they were equal; PF is
    # expected to be ahead).
    checker = llm.step_checker()
    pf = llm.particle_filtering(jax.random.key(1), b.step, checker, problems, N)
    bon = llm.best_of_n(jax.random.key(2), b.step, checker, problems, N)
    se = np.hypot(pf.stderr, bon.stderr)
    assert pf.accuracy >= bon.accuracy - 2 * se, (pf.accuracy, bon.accuracy)
    assert pf.accuracy > 0.0 and bon.accuracy > 0.0
    # best-of-N with the perfect verifier is right exactly when some draw is right all the way
    some_right = np.array([any(task.check_solution(p, bon.text(i, j)) and bon.final_rewards[i, j] == 1.0
                               for j in range(N)) for i, p in enumerate(task.sample_problems(0, NUM_PROBLEMS))])
    np.testing.assert_array_equal(bon.is_correct, some_right)
    # the budget is of the same size (PF's extra work is resampling, not generating)
    assert 0.5 < pf.tokens.sum() / bon.tokens.sum() < 2.0


def test_beam_search_and_particle_gibbs_at_the_same_budget(b, problems):
    # Budget N = 8: beam search with 8 particles (2 beams of 4), particle Gibbs with 4
    # particles x 2 sweeps. With the perfect verifier both search on the verdict, so they
    # are at least as accurate as best-of-8 (2 s.e. of the difference), and spend about the
    # same number of tokens.
    checker = llm.step_checker()
    bon = llm.best_of_n(jax.random.key(2), b.step, checker, problems, N)
    beam = llm.beam_search(jax.random.key(4), b.step, checker, problems, N, beam_width=2)
    pg = llm.particle_gibbs(jax.random.key(4), b.step, checker, problems, N // 2, num_iterations=2)
    for res in (beam, pg):
        assert res.accuracy >= bon.accuracy - 2 * np.hypot(res.stderr, bon.stderr), (res.method, res.accuracy)
        assert 0.5 < res.tokens.sum() / bon.tokens.sum() < 2.0
    assert pg.answers.shape == (NUM_PROBLEMS, N // 2)
    # particle Gibbs counts both sweeps: about twice what 4 independent solutions take
    four = bon.first(N // 2, "argmax")
    assert 1.5 < pg.lm_calls.sum() / four.lm_calls.sum() < 2.5


def test_budget_counts_what_was_generated(b, problems):
    bon = llm.best_of_n(jax.random.key(2), b.step, llm.step_checker(), problems, N)
    # no resampling: each particle's final text is exactly what it generated
    lengths = np.array([[len(bon.text(i, j)) for j in range(N)] for i in range(NUM_PROBLEMS)])
    np.testing.assert_array_equal(bon.tokens, lengths.sum(1))
    # a step call per step a particle took before finishing: the steps end in "\n" or "$"
    # (or are max_step_len long, or the last of the T steps)
    steps = np.array([[_num_steps(bon.text(i, j)) for j in range(N)] for i in range(NUM_PROBLEMS)])
    np.testing.assert_array_equal(bon.lm_calls, steps.sum(1))
    np.testing.assert_array_equal(bon.prm_calls, bon.lm_calls)
    # self-consistency reads the same draws (same key): same budget, the plain majority
    sc = llm.self_consistency(jax.random.key(2), b.step, llm.step_checker(), problems, N)
    np.testing.assert_array_equal(sc.tokens, bon.tokens)
    np.testing.assert_array_equal(sc.answer, llm.select_answer(bon.answers, bon.log_weights, "majority"))


def test_results_do_not_depend_on_chunk_or_layout(b, problems):
    # Particle keys come from the problem's index: the 24 problems as one population, or
    # 7 per call one after another (the last call padded), give what one call with all 24
    # one after another gives (the checker's rewards are exact, so bit for bit).
    checker = llm.step_checker()
    whole = llm.particle_filtering(jax.random.key(1), b.step, checker, problems, N)
    for kw in ({"chunk": 7}, {"layout": "population"}):
        other = llm.particle_filtering(jax.random.key(1), b.step, checker, problems, N, **kw)
        for name in ("answers", "log_weights", "final_tokens", "step_rewards", "slot_calls", "slot_tokens"):
            np.testing.assert_array_equal(getattr(other, name), getattr(whole, name), err_msg=f"{kw} {name}")
    with pytest.raises(ppl.ArgumentError, match="chunk must be an int >= 1"):
        llm.particle_filtering(jax.random.key(1), b.step, checker, problems, N, chunk=0)
    with pytest.raises(ppl.ArgumentError, match="layout must be one of"):
        llm.best_of_n(jax.random.key(1), b.step, checker, problems, N, layout="batched")


def _num_steps(text: str) -> int:
    count, current = 0, 0
    for c in text:
        current += 1
        if c in "\n$" or current == task.MAX_STEP_LEN:
            count, current = count + 1, 0
    count += current > 0
    return count if "$" in text else llm.builtin().num_steps


# -- resampling gathers whole states -----------------------------------------------------------------


def test_a_resampled_particle_continues_as_its_ancestor(b, problems):
    reward = llm.step_checker()
    model = llm.reasoning_model(b.step, reward, b.num_steps)
    problem = problems[3]
    carry = llm.init_carry(b.step, reward, problem)
    res = smc.particle_filter(jax.random.key(5), model, (carry, problem.expected), {}, 6,
                              resampling="multinomial", ess_threshold=1.0, is_finished=llm.is_finished)
    steps = res.step_particles
    t = 2
    ancestors = np.asarray(res.ancestors[t])
    assert not np.array_equal(ancestors, np.arange(6))  # particles were copied and dropped
    entering = steps.args[0].lm  # the carry each particle entered step t with (after the gather)
    previous = steps.retval[0].lm  # the carry each particle left step t - 1 with
    for j in range(6):
        mine = jax.tree.map(lambda x: x[t, j], entering)
        theirs = jax.tree.map(lambda x: x[t - 1, ancestors[j]], previous)
        jax.tree.map(np.testing.assert_array_equal, mine, theirs)
        # the gathered cache is the cache of the gathered text: recompute it from scratch
        length = int(mine.length)
        fresh = init_state(b.step.model, mine.tokens[:length], b.cache_size)
        np.testing.assert_allclose(mine.cache.keys[:, : length - 1], fresh.cache.keys[:, : length - 1], atol=1e-5)
        # and it continues as the ancestor would: same key, same step
        k = jax.random.key(j)
        np.testing.assert_array_equal(b.step.sample(k, mine)[1], b.step.sample(k, theirs)[1])
    # the density of the stored step at the gathered state is the stored score
    j = 0
    tr_score = steps.score[t, j] if jnp.ndim(steps.score) == 2 else None
    lp, _ = b.step.score(jax.tree.map(lambda x: x[t, j], entering), steps["step"][t, j])
    rewards = steps["prm"][t, j]
    previous_reward = steps.args[0].reward[t, j]
    assert tr_score is None or np.isclose(float(tr_score), float(lp + jnp.log(rewards) - jnp.log(previous_reward)),
                                          atol=1e-4)


# -- what the methods keep: choices and rewards, no KV caches ---------------------------------------------


@pytest.mark.parametrize("method", [pytest.param("its_hub", marks=pytest.mark.slow), "ratio"])
def test_methods_read_from_the_choices_what_the_carries_say(b, problems, method):
    # The methods run the filter with history="choices" and rebuild each final particle's
    # text from its lineage's step tokens. Run the same filters directly with whole traces
    # (same keys: problem i draws under fold_in(key, i)) and read the carries instead.
    checker = llm.step_checker(fp=0.1, fn=0.05)
    key = jax.random.key(21)
    if method == "its_hub":
        res = llm.its_hub_particle_filtering(key, b.step, checker, problems[:6], N)
        options = dict(link="logit", weighting="current")
        run = dict(resampling="multinomial", ess_threshold=1.0)
    else:
        res = llm.particle_filtering(key, b.step, checker, problems[:6], N, ess_threshold=1.0)
        options, run = {}, dict(ess_threshold=1.0, is_finished=llm.is_finished)
    model = llm.reasoning_model(b.step, checker, b.num_steps, **options)
    link = options.get("link", "log")
    for i in range(6):
        problem = problems[i]
        args = (llm.init_carry(b.step, checker, problem, link=link), problem.expected)
        full = smc.particle_filter(jax.random.fold_in(key, i), model, args, {}, N, **run)
        steps = full.step_particles
        after, before = steps.retval[0], steps.args[0]
        done = np.asarray(after.lm.is_finished)  # [T, N] finished after step t
        t = int(np.argmax(done.all(1))) if method == "its_hub" and done.all(1).any() else b.num_steps - 1
        np.testing.assert_array_equal(res.final_tokens[i], after.lm.tokens[t])
        np.testing.assert_array_equal(res.final_rewards[i], after.reward[t])
        np.testing.assert_array_equal(res.log_weights[i], full.step_log_weights[t])
        np.testing.assert_array_equal(res.slot_calls[i], (~np.asarray(before.lm.is_finished)).sum(0))
        assert 0 < t and np.asarray(full.resampled).any()
        # the same run with history="choices": same weights and genealogy, no cache kept
        light = smc.particle_filter(jax.random.fold_in(key, i), model, args, {}, N, history="choices", **run)
        np.testing.assert_array_equal(light.ancestors, full.ancestors)
        np.testing.assert_array_equal(light.step_log_weights, full.step_log_weights)
        np.testing.assert_array_equal(light.step_particles["step"], steps["step"])
        cache_shape = after.lm.cache.keys.shape[2:]
        assert not any(leaf.shape[-len(cache_shape):] == cache_shape for leaf in jax.tree.leaves(light._steps))
        assert sum(leaf.nbytes for leaf in jax.tree.leaves(light._steps)) < 0.01 * sum(
            leaf.nbytes for leaf in jax.tree.leaves(full._steps))


def test_population_step_is_one_token_loop_over_every_row(b, problems):
    # Problems x particles under two vmaps: the population step draws what the plain step
    # draws, row by row, in one while loop whose rows are all P * N particles.
    pstep = llm.population_step(b.step)
    assert llm.population_step(b.step) is pstep and llm.population_step(pstep) is pstep
    p, n = 3, 5

    def draw(step):
        def per_problem(key, problem):
            state = init_state(step.model, problem.prompt, b.cache_size, prompt_length=problem.prompt_length)
            return jax.vmap(lambda i: step.sample(ppl.particle_key(key, i), state))(jnp.arange(n))
        return jax.vmap(per_problem)

    keys = jax.random.split(jax.random.key(9), p)
    (s_pop, tok_pop, lp_pop), (s, tok, lp) = (jax.jit(draw(st))(keys, problems[:p]) for st in (pstep, b.step))
    np.testing.assert_array_equal(tok_pop, tok)
    np.testing.assert_array_equal(s_pop.tokens, s.tokens)
    np.testing.assert_allclose(lp_pop, lp, atol=1e-5)
    assert tok.shape == (p, n, b.step.max_step_len) and (tok[:, :, 0] >= 0).all()

    def while_row_counts(jaxpr):
        counts = []
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "while":
                counts.append({v.aval.shape[0] for v in eqn.outvars if v.aval.ndim == 2 and v.aval.shape[1] ==
                               b.cache_size})
            for sub in jaxprs_in_params(eqn.params):
                counts += while_row_counts(sub)
        return counts

    loops = while_row_counts(jax.make_jaxpr(draw(pstep))(keys, problems[:p]).jaxpr)
    assert loops == [{p * n}]  # one loop, carrying the tokens [P * N, S] of every row


# -- the weightings -------------------------------------------------------------------------------------


def test_its_hub_weights_are_the_logits_of_the_current_prefix(b, problems):
    checker = llm.step_checker(fp=0.1, fn=0.1)
    res = llm.its_hub_particle_filtering(jax.random.key(3), b.step, checker, problems, N)
    eps = np.finfo(np.float32).eps  # ppl.reward's logit clips to [eps, 1 - eps] of the reward's float type
    r = jnp.clip(jnp.asarray(res.final_rewards), eps, 1 - eps)
    expected = jax.nn.log_softmax(jnp.log(r) - jnp.log1p(-r), axis=1)
    np.testing.assert_allclose(res.log_weights, expected, atol=1e-3)
    # the answer of the largest final weight among the particles that gave one
    best = np.where(res.answers >= 0, res.log_weights, -np.inf).argmax(1)
    answered = (res.answers >= 0).any(1)
    np.testing.assert_array_equal(res.answer[answered], res.answers[np.arange(NUM_PROBLEMS), best][answered])


def test_ratio_weights_are_the_reward_of_the_whole_solution(b, problems):
    # best_of_n runs the "ratio" weighting without resampling: the filter's own final
    # weights are log r(final prefix); the "last" aggregate reads the same numbers.
    bon = llm.best_of_n(jax.random.key(2), b.step, llm.step_checker(), problems, N)
    np.testing.assert_allclose(bon.log_weights, np.log(bon.final_rewards), atol=1e-6)


def test_learned_prm_cached_equals_recomputed(b, problems):
    cached, recomputed = llm.learned_prm(b.prm.model), llm.learned_prm(b.prm.model, cached=False)
    problem = problems[0]
    key = jax.random.key(0)
    traces = [llm.reasoning_model(b.step, r, b.num_steps).simulate(key, (llm.init_carry(b.step, r, problem),
                                                                         problem.expected))
              for r in (cached, recomputed)]
    np.testing.assert_array_equal(traces[0]["step"], traces[1]["step"])
    np.testing.assert_allclose(traces[0]["prm"], traces[1]["prm"], atol=1e-5)
    assert np.all((traces[0]["prm"] > 0) & (traces[0]["prm"] < 1))


def test_checker_noise_is_deterministic_and_calibrated(problems):
    # u from the hash is uniform: over many distinct (problem, step) pairs the share of
    # flipped verdicts is fp for wrong prefixes (4 s.e. of a binomial share).
    noisy = llm.step_checker(fp=0.3, fn=0.0)
    tokens = jax.random.randint(jax.random.key(0), (2000, task.MAX_STEP_LEN), 0, len(task.VOCAB))
    expected = problems.expected[0, 0]
    score = jax.jit(jax.vmap(lambda tok, pid: noisy.score((jnp.ones((), bool), pid), None, tok, expected)[0]))
    pids = jnp.arange(2000) % 7
    r = np.asarray(score(tokens, pids))
    share = np.mean(r == 1.0)
    assert abs(share - 0.3) < 4 * np.sqrt(0.3 * 0.7 / 2000)
    np.testing.assert_array_equal(r, np.asarray(score(tokens, pids)))  # same step, same verdict


# -- answers and selection -----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(list(task.VOCAB[1:])), min_size=0, max_size=30))
def test_answers_from_tokens_agrees_with_the_task(chars):
    text = "".join(chars)
    if text.count("$") > 1:
        text = text.replace("$", "")
    ids = np.full(40, -1, np.int32)
    ids[: len(text)] = task.encode(text)
    expected = task.extract_answer(text)
    assert llm.answers_from_tokens(ids[None])[0] == (-1 if expected is None else expected)
    for good in ("A: 32$", "7+5=12\nA: 7$"):
        ids = np.full(40, -1, np.int32)
        ids[: len(good)] = task.encode(good)
        assert llm.answers_from_tokens(ids) == task.extract_answer(good)


def test_select_answer():
    answers = np.array([[3, 5, 5, -1], [-1, -1, -1, -1]])
    log_w = np.log(np.array([[0.6, 0.15, 0.15, 0.1], [0.25] * 4]))
    np.testing.assert_array_equal(llm.select_answer(answers, log_w, "argmax"), [3, -1])
    np.testing.assert_array_equal(llm.select_answer(answers, log_w, "vote"), [3, -1])
    np.testing.assert_array_equal(llm.select_answer(answers, log_w, "majority"), [5, -1])


# -- errors --------------------------------------------------------------------------------------------


def test_a_reward_outside_0_1_names_problem_step_and_particle(b, problems):
    # 1.5 once the prefix is longer than the prompt + 8 tokens, else 0.5
    bad = llm.stateless(lambda state, tokens, x: jnp.where(state.length > state.prompt_length + 8, 1.5, 0.5), "bad")
    with pytest.raises(ppl.InferenceError, match=r"'bad' returned 1\.5 for problem 0, step \d \(counting from 0\), particle \d; .*\(0, 1\]"):
        llm.best_of_n(jax.random.key(0), b.step, bad, problems[:2], 2)
    nan = llm.stateless(lambda state, tokens, x: jnp.float32(jnp.nan), "nan")
    with pytest.raises(ppl.InferenceError, match=r"'nan' returned nan for problem 0, step 0 \(counting from 0\), particle 0"):
        llm.best_of_n(jax.random.key(0), b.step, nan, problems[:2], 2)


def test_argument_errors(b, problems):
    checker = llm.step_checker()
    with pytest.raises(ppl.ArgumentError, match="selection"):
        llm.particle_filtering(jax.random.key(0), b.step, checker, problems, 4, selection="best")
    with pytest.raises(ppl.ArgumentError, match="aggregate"):
        llm.best_of_n(jax.random.key(0), b.step, checker, problems, 4, aggregate="max")
    with pytest.raises(ppl.ArgumentError, match="beam_width must divide"):
        llm.beam_search(jax.random.key(0), b.step, checker, problems, 8, beam_width=3)
    with pytest.raises(ppl.ArgumentError, match="num_particles >= 2"):
        llm.particle_gibbs(jax.random.key(0), b.step, checker, problems, 1)
    with pytest.raises(ppl.ArgumentError, match="ProblemBatch"):
        llm.best_of_n(jax.random.key(0), b.step, checker, task.sample_problems(0, 2), 4)
    with pytest.raises(ppl.ArgumentError, match="weighting"):
        llm.reasoning_model(b.step, checker, 6, weighting="sum")
    with pytest.raises(ppl.ArgumentError, match="fp"):
        llm.step_checker(fp=1.5)
    with pytest.raises(ppl.ArgumentError, match="python -m smc.llm.train"):
        llm.builtin("/nonexistent")


@pytest.mark.parametrize("name", ["smc.llm._rewards", "smc.llm._methods", "smc.llm._builtin", "smc.llm._model",
                                  "smc.llm._population"])
def test_docstring_examples(name):
    globs = {"jax": jax, "jnp": jnp, "ppl": ppl, "smc": smc}
    failures, attempted = doctest.testmod(importlib.import_module(name), extraglobs=globs, verbose=False)
    assert attempted > 0 and failures == 0
