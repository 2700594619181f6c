"""`ppl.switch`: the rules for untaken branches, the index range and moves between branches.

Each test failed on the earlier switch. Expected values are numpyro `log_prob`s worked
out by hand. The rules (see `ppl/_switch.py`): a concrete index runs and reports only
the chosen branch, and must lie in range; a traced index runs every branch through
`jax.lax.switch` with the placeholders as operands, reports the union of the branches'
addresses, and is clamped as `jax.lax.switch` clamps it.
"""

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
import pytest
from conftest import assert_close

import ppl

Y = 0.5  # the observation of the branches with evidence
PROBS = jnp.array([0.01, 0.99])  # the index prior of `mixture`: regenerating k flips it to 1


@ppl.gen
def halfnormal_branch():
    return ppl.sample("s", dist.HalfNormal(1.0))


@ppl.gen
def normal_branch():
    return ppl.sample("r", dist.Normal(0.0, 1.0))


SWITCH = ppl.switch(halfnormal_branch, normal_branch)


@ppl.gen
def narrow_v():
    return ppl.sample("v", dist.Normal(0.0, 1.0))


@ppl.gen
def wide_v():
    return ppl.sample("v", dist.Normal(0.0, 10.0))


SHARED = ppl.switch(narrow_v, wide_v)  # both branches at address "v"


@ppl.gen
def positive_v():
    return ppl.sample("v", dist.HalfNormal(1.0))


SIGNED = ppl.switch(positive_v, narrow_v)  # "v" < 0 lies outside branch 0's support


@ppl.gen
def halfnormal_observed():
    s = ppl.sample("s", dist.HalfNormal(1.0))
    ppl.sample("y", dist.Normal(s, 1.0), obs=Y)
    return s


@ppl.gen
def normal_observed():
    r = ppl.sample("r", dist.Normal(0.0, 1.0))
    ppl.sample("y", dist.Normal(r, 2.0), obs=Y)
    return r


OBSERVED = ppl.switch(halfnormal_observed, normal_observed)


@ppl.gen
def mixture():
    k = ppl.sample("k", dist.Categorical(PROBS))
    return ppl.sample("c", OBSERVED, k)


def halfnormal(s):
    return dist.HalfNormal(1.0).log_prob(s)


def normal(r):
    return dist.Normal(0.0, 1.0).log_prob(r)


def evidence_s(s):
    return dist.Normal(s, 1.0).log_prob(Y)


def evidence_r(r):
    return dist.Normal(r, 2.0).log_prob(Y)


def element(batch, j):
    """Trace `j` of a batch of traces (its index is then a concrete scalar)."""
    return jax.tree.map(lambda x: x[j], batch)


# -- untaken branches are neither checked nor reported -------------------------------------


@pytest.mark.parametrize("index", [1, jnp.int32(1)], ids=["python-int", "array"])
def test_assess_does_not_check_the_untaken_branch(index):
    lp, retval = SWITCH.assess({"r": 0.3}, (index,))
    assert_close(lp, normal(0.3))
    assert_close(retval, 0.3)
    lp, _ = SWITCH.assess({"s": 0.7}, (0,))
    assert_close(lp, halfnormal(0.7))


@pytest.mark.parametrize("transform", [jax.jit, jax.vmap], ids=["jit", "vmap"])
def test_a_traced_index_passes_choices_and_placeholders_as_operands(key, transform):
    # The placeholder of "s" and the constant -0.5 are concrete (under vmap at least);
    # as operands they are traced in the untaken branch 0, which checks no support.
    indices = jnp.array([1, 1]) if transform is jax.vmap else jnp.int32(1)
    lp = transform(lambda i: SWITCH.assess({"r": 0.3}, (i,))[0])(indices)
    assert_close(lp, normal(0.3))
    old = SIGNED.simulate(key, (1,))

    def run(i):
        lp, _ = SIGNED.assess({"v": -0.5}, (i,))
        _, w = SIGNED.generate(key, {"v": -0.5}, (i,))
        _, w_update, _ = SIGNED.update(key, old, {"v": -0.5}, (i,))
        return lp, w, w_update

    lp, w, w_update = transform(run)(indices)
    assert_close(lp, normal(-0.5))
    assert_close(w, normal(-0.5))
    assert_close(w_update, normal(-0.5) - normal(old["v"]))


@pytest.mark.parametrize("index", [0, 1, jnp.int32(0), jnp.int32(1)], ids=["0", "1", "array-0", "array-1"])
def test_a_concrete_index_reports_only_the_chosen_branch(key, index):
    tr = SWITCH.simulate(key, (index,))
    address, density = [("s", halfnormal), ("r", normal)][int(index)]
    assert tr.choices.addresses() == [(address,)]
    assert_close(tr.score, density(tr[address]))
    gtr, w = SWITCH.generate(key, tr.choices, (index,))
    assert_close(w, tr.score)
    assert_close(gtr.score, tr.score)


@pytest.mark.parametrize("index", [0, 1])
def test_a_traced_index_reports_the_union_of_the_branches(key, index):
    @jax.jit
    def round_trip(k, i):
        tr = SWITCH.simulate(k, (i,))
        _, w = SWITCH.generate(k, tr.choices, (i,))
        return tr, tr.choices, w

    tr, choices, w = round_trip(key, jnp.int32(index))
    address, density = [("s", halfnormal), ("r", normal)][index]
    other = "r" if address == "s" else "s"
    assert choices.addresses() == [("r",), ("s",)]
    assert_close(choices[address], tr[address])
    assert_close(choices[other], 0.0)  # the untaken branch's placeholder
    assert_close(tr.score, density(tr[address]))
    assert_close(w, tr.score)
    # Back outside jit the index is concrete again: only the chosen branch is reported.
    assert tr.choices.addresses() == [(address,)]


# -- the index range --------------------------------------------------------------------------


@pytest.mark.parametrize("index", [5, -1, jnp.int32(2)], ids=["5", "-1", "array-2"])
def test_a_concrete_index_out_of_range_is_an_argument_error(key, index):
    message = rf"index {int(index)} .*2 branches"
    with pytest.raises(ppl.ArgumentError, match=message):
        SHARED.simulate(key, (index,))
    with pytest.raises(ppl.ArgumentError, match=message):
        SHARED.assess({"v": 0.3}, (index,))
    with pytest.raises(ppl.ArgumentError, match=message):
        SHARED.generate(key, {"v": 0.3}, (index,))
    tr = SHARED.simulate(key, (0,))
    with pytest.raises(ppl.ArgumentError, match=message):
        SHARED.update(key, tr, {}, (index,))


@pytest.mark.parametrize("index, scale", [(5, 10.0), (-3, 1.0)])
def test_a_traced_index_is_clamped_in_every_method(key, index, scale):
    density = dist.Normal(0.0, scale).log_prob

    @jax.jit
    def run(k, i):
        tr = SHARED.simulate(k, (i,))
        lp, _ = SHARED.assess({"v": 0.3}, (i,))
        _, w = SHARED.generate(k, {"v": 0.3}, (i,))
        inside = (tr.choices["v"], SHARED.project(tr, ppl.Selection.all()))
        return tr, lp, w, inside

    tr, lp, w, (v, projected) = run(key, jnp.int32(index))
    assert_close(tr.score, density(v))
    assert_close(projected, tr.score)
    assert_close(lp, density(0.3))
    assert_close(w, density(0.3))
    # Outside jit the index is a concrete out-of-range array; reading the trace clamps it.
    assert_close(tr["v"], v)
    assert_close(SHARED.project(tr, ppl.Selection.all()), tr.score)
    assert_close(SHARED.project(tr, ppl.Selection.none()), 0.0)


# -- moving between branches ----------------------------------------------------------------


@pytest.mark.parametrize("index", [jnp.int32, int], ids=["array", "python-int"])
def test_update_to_another_branch_discards_the_old_one(key, index):
    old = SWITCH.simulate(key, (index(0),))
    s = old["s"]
    new, w, discard = SWITCH.update(key, old, {}, (index(1),))
    assert_close(w, -halfnormal(s))  # the new branch's fresh choices cancel
    assert new.choices.addresses() == [("r",)]
    assert_close(new.score, normal(new["r"]))
    assert discard.addresses() == [("s",)]
    assert_close(discard["s"], s)
    # With the new branch constrained, then moved back with the discard.
    new, w, discard = SWITCH.update(key, old, {"r": 0.3}, (index(1),))
    assert_close(w, normal(0.3) - halfnormal(s))
    back, w_back, discard_back = SWITCH.update(key, new, discard, (index(0),))
    assert_close(back["s"], s)
    assert_close(w_back, halfnormal(s) - normal(0.3))
    assert_close(discard_back["r"], 0.3)


@pytest.mark.parametrize(
    "old_index, new_index",
    [(jnp.int32(0), jnp.int32(1)), (0, jnp.int32(1)), (jnp.int32(0), 1)],
    ids=["both-traced", "old-python-int", "new-python-int"],
)
def test_update_to_another_branch_under_jit(key, old_index, new_index):
    old = SWITCH.simulate(key, (old_index,))
    s = old["s"]

    @jax.jit
    def move(k, tr, constraints):
        return SWITCH.update(k, tr, constraints, (new_index,))

    new, w, discard = move(key, old, {})
    assert_close(w, -halfnormal(s))
    assert_close(new.score, normal(new["r"]))
    assert_close(discard["s"], s)
    new, w, _ = move(key, old, {"r": 0.3})
    assert_close(new["r"], 0.3)
    assert_close(w, normal(0.3) - halfnormal(s))


def test_update_of_a_model_that_changes_the_index(key):
    old, _ = mixture.generate(key, {"k": 0}, ())
    s = old["c", "s"]
    old_score = jnp.log(PROBS[0]) + halfnormal(s) + evidence_s(s)
    assert_close(old.score, old_score)
    for update in (mixture.update, jax.jit(mixture.update, static_argnums=3)):
        new, w, discard = update(key, old, {"k": 1}, ())
        r = new["c", "r"]
        assert_close(new.score, jnp.log(PROBS[1]) + normal(r) + evidence_r(r))
        # new branch's generate weight (its evidence) - old branch's score, plus k's ratio
        assert_close(w, jnp.log(PROBS[1]) + evidence_r(r) - old_score)
        assert_close(discard["k"], 0)
        assert_close(discard["c", "s"], s)


def test_regenerate_into_another_branch_weighs_the_evidence(key):
    old, _ = mixture.generate(key, {"k": 0}, ())
    s = old["c", "s"]
    for regenerate in (mixture.regenerate, jax.jit(mixture.regenerate, static_argnums=2)):
        new, w = regenerate(key, old, ppl.select("k"))
        assert int(new["k"]) == 1
        r = new["c", "r"]
        assert_close(w, evidence_r(r) - evidence_s(s))
        assert_close(new.score, jnp.log(PROBS[1]) + normal(r) + evidence_r(r))
        assert_close(mixture.project(new, ppl.Selection.none()), evidence_r(r))


# -- the GFI identities at every index, under jit and vmap ------------------------------------


@pytest.mark.parametrize("gf", [SWITCH, SHARED, OBSERVED], ids=["switch", "shared", "observed"])
@pytest.mark.parametrize("index", [0, 1])
def test_generate_with_every_choice_reproduces_the_score(key, gf, index):
    for i in (index, jnp.int32(index)):
        tr = gf.simulate(key, (i,))
        _, w = gf.generate(key, tr.choices, (i,))
        assert_close(w, tr.score)

    @jax.jit
    def traced(k, i):
        tr = gf.simulate(k, (i,))
        return tr.score, gf.generate(k, tr.choices, (i,))[1]

    score, w = traced(key, jnp.int32(index))
    assert_close(w, score)


def test_update_and_regenerate_a_batch_of_traces_at_different_indices(key):
    keys = jax.random.split(key, 4)
    old_index, new_index = jnp.array([0, 1, 1, 0]), jnp.array([1, 1, 0, 0])
    olds = jax.vmap(lambda k, i: OBSERVED.simulate(k, (i,)))(keys, old_index)
    update = jax.jit(jax.vmap(lambda k, tr, i: OBSERVED.update(k, tr, {}, (i,))))
    news, w, _ = update(keys, olds, new_index)
    regenerate = jax.jit(jax.vmap(lambda k, tr: OBSERVED.regenerate(k, tr, ppl.select("s"))))
    regenerated, w_regen = regenerate(keys, olds)
    for j in range(4):
        old, new, regen = element(olds, j), element(news, j), element(regenerated, j)
        if int(old_index[j]) == 0:
            s = old["s"]
            assert_close(old.score, halfnormal(s) + evidence_s(s))
            assert_close(w_regen[j], evidence_s(regen["s"]) - evidence_s(s))
        else:
            r = old["r"]
            assert_close(old.score, normal(r) + evidence_r(r))
            assert_close(regen["r"], r)
            assert_close(w_regen[j], 0.0)
        if int(new_index[j]) == int(old_index[j]):
            assert_close(w[j], 0.0)
        elif int(new_index[j]) == 1:
            assert_close(w[j], evidence_r(new["r"]) - old.score)
        else:
            assert_close(w[j], evidence_s(new["s"]) - old.score)


def test_regenerate_a_batch_of_models_flips_some_branches(key):
    keys = jax.random.split(key, 4)
    constraints = {"k": jnp.array([0, 1, 0, 1])}
    olds, _ = jax.vmap(lambda k, c: mixture.generate(k, c, ()))(keys, constraints)
    news, w = jax.jit(jax.vmap(lambda k, tr: mixture.regenerate(k, tr, ppl.select("k"))))(keys, olds)
    for j in range(4):
        old, new = element(olds, j), element(news, j)
        assert int(new["k"]) == 1
        if int(old["k"]) == 0:
            assert_close(w[j], evidence_r(new["c", "r"]) - evidence_s(old["c", "s"]))
        else:
            assert_close(new["c", "r"], old["c", "r"])
            assert_close(w[j], 0.0)


# -- branches must agree on their return value --------------------------------------------


@pytest.mark.parametrize("index", [0, jnp.int32(0)], ids=["python-int", "array"])
def test_branches_must_return_the_same_structure(key, index):
    @ppl.gen
    def vector():
        return ppl.sample("w", dist.Normal(0.0, 1.0).expand((2,)))

    with pytest.raises(ppl.ArgumentError, match="same structure"):
        ppl.switch(normal_branch, vector).simulate(key, (index,))
