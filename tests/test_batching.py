"""Batches that keep shared leaves once (`ppl.extend.vmap_states`, `StepProgram`,
`vmap_shared`): the same values as a plain `jax.vmap`, with the arguments and
observations held once and the iteration counter carried unbatched."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import inference
import ppl
from ppl.extend import StepProgram, vmap_shared, vmap_states

X = jax.random.normal(jax.random.key(1), (50, 3))
Y = (X @ jnp.array([1.0, -0.5, 0.25]) > 0).astype(jnp.float32)


@ppl.gen
def logreg(x):
    beta = ppl.sample("beta", dist.Normal(jnp.zeros(x.shape[1]), 1.0))
    scale = ppl.sample("scale", dist.HalfNormal(1.0))
    return ppl.sample("y", dist.Bernoulli(logits=scale * (x @ beta)))


def _start(batched, shared):
    (k,) = batched
    x, obs = shared
    trace, _ = logreg.generate(k, obs, (x,))
    return inference.nuts().init(trace, observed=obs, num_warmup=20)


def _plain_start(k):
    return _start((k,), (X, ppl.ChoiceMap({"y": Y})))


def _step(k, state):
    state, info = inference.nuts().step(k, state)
    return state, info.accept_prob


@pytest.mark.slow  # heavy for the 15-minute CI budget: pytest -m slow runs it
def test_states_hold_arguments_and_observations_once():
    n = 6
    keys = jax.random.split(jax.random.key(0), n)
    shared = (X, ppl.ChoiceMap({"y": Y}))
    layout, own = vmap_states(_start, (keys,), shared)
    # no own leaf is a per-chain copy of the design matrix or of the observations
    assert not any(jnp.shape(leaf)[1:] in (X.shape, Y.shape) for leaf in own)
    assert all(s is not None for s in layout.sources if s is not None)
    plain = jax.vmap(_plain_start)(keys)
    joined = layout.join(own, shared, broadcast=lambda leaf: jnp.broadcast_to(leaf, (n,) + jnp.shape(leaf)))
    for a, b in zip(jax.tree.leaves(joined), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(jax.random.key_data(a) if _is_key(a) else a,
                                      jax.random.key_data(b) if _is_key(b) else b)


def _is_key(x):
    return jax.dtypes.issubdtype(jnp.result_type(x), jax.dtypes.prng_key)


@pytest.mark.slow  # every run_nuts in CI steps through StepProgram; this compares it with plain vmap
def test_step_program_equals_plain_vmap_through_warmup_and_after():
    """30 NUTS steps, 20 of them adapting: the counters are carried unbatched (warmup or
    not, end of window: branches, not selects), the step size and mass matrix per chain; every state leaf and every
    acceptance probability equals the plain `jax.vmap(step)` run's. In float64: the
    shared design matrix is multiplied in another order than the batched copies, and in
    float32 that rounding difference can flip a tree-doubling decision in 30 steps."""
    with jax.enable_x64(True):
        _compare_with_plain_vmap()


def _compare_with_plain_vmap():
    n = 4
    keys = jax.random.split(jax.random.key(0), n)
    x, y = X.astype(jnp.float64), Y.astype(jnp.float64)
    shared = (x, ppl.ChoiceMap({"y": y}))
    layout, own = vmap_states(_start, (keys,), shared)
    stepper = StepProgram(_step, layout, keys[0], own, shared)
    own = stepper.adopt(own, n)
    names = _own_paths(stepper.layout)
    uniform = {p for p, u in zip(names, stepper.layout.uniform) if u and p.startswith(".hmc")}
    # the counters (iteration, adaptation window, dual-averaging and Welford counts) and
    # the adaptation's key; the step size and mass matrix adapt per chain
    assert uniform == {".hmc.i", ".hmc.adapt_state.window_idx", ".hmc.adapt_state.ss_state[3]",
                       ".hmc.adapt_state.mm_state[2]", ".hmc.adapt_state.rng_key"}, uniform
    assert ".hmc.adapt_state.step_size" in {p for p, u in zip(names, layout.uniform) if u}  # demoted

    plain = jax.vmap(lambda k: _start((k,), shared))(keys)
    step_keys = jax.random.split(jax.random.key(2), (30, n))

    def ours(own, k):
        return stepper(k, own, shared)

    def theirs(states, k):
        return jax.vmap(_step)(k, states)

    own, acc = jax.jit(lambda o: jax.lax.scan(ours, o, step_keys))(own)
    states, acc_plain = jax.jit(lambda s: jax.lax.scan(theirs, s, step_keys))(plain)
    # float64 rounding (1e-16) of energies of size 1e2-1e3, through exp(-energy error): 1e-6
    np.testing.assert_allclose(acc, acc_plain, rtol=1e-6)
    assert float(acc.min()) < 1.0  # the chains moved and adapted
    joined = stepper.layout.join(own, shared, broadcast=lambda leaf: jnp.broadcast_to(leaf, (n,) + jnp.shape(leaf)))
    for a, b in zip(jax.tree.leaves(joined), jax.tree.leaves(states)):
        if _is_key(a):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def _own_paths(layout) -> list:
    probe = jax.tree.unflatten(layout.treedef, list(range(len(layout.sources))))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(probe)[0]]
    return [p for p, s in zip(paths, layout.sources) if s is None]


def test_a_leaf_the_step_makes_per_member_is_not_kept_uniform():
    """A counter stays uniform; a value that starts equal but moves with the key does
    not (keeping it uniform would give every member the first member's value)."""

    def start(batched, shared):
        (k,) = batched
        return {"count": jnp.zeros((), jnp.int32), "walk": jnp.zeros(()), "offset": shared}

    def step(k, state):
        return {"count": state["count"] + 1, "walk": state["walk"] + jax.random.normal(k),
                "offset": state["offset"]}, state["walk"]

    keys = jax.random.split(jax.random.key(0), 5)
    layout, own = vmap_states(start, (keys,), jnp.ones(3))
    assert layout.uniform == (True, True) and layout.sources.count(None) == 2  # offset is shared
    stepper = StepProgram(step, layout, keys[0], own, jnp.ones(3))
    assert stepper.layout.uniform == (True, False)
    own = stepper.adopt(own, 5)
    own, _ = stepper(keys, own, jnp.ones(3))
    count, walk = own
    assert count.shape == () and int(count) == 1
    np.testing.assert_allclose(walk, jax.vmap(jax.random.normal)(keys))


def test_vmap_shared_leaves_unbatched_what_depends_on_no_member():
    data = jnp.arange(4.0)

    def fn(i):
        return {"data": data * 2, "own": data * i}

    out, is_batched = vmap_shared(fn, jnp.arange(3.0))
    assert out["data"].shape == (4,) and out["own"].shape == (3, 4)
    assert sorted(is_batched) == [False, True]


def test_dependence_follows_control_flow_as_vmap_batches_it():
    """cond on a member-independent index, while and scan carries, nested jit: an output
    is per member exactly when jax.vmap batches it, and the values equal plain vmap's.
    A conservative reading (every output of an equation with a per-member input is per
    member) would batch `window` here, and numpyro's end-of-window step-size search
    would then run at every warmup step as a select."""
    count = jnp.asarray(3, jnp.int32)

    def fn(x):
        # cond on an independent predicate: `window` passes through both branches
        window, y = jax.lax.cond(count > 2, lambda w, v: (w + 1, v * 2.0), lambda w, v: (w, v), count, x)
        # cond on a per-member predicate: a select, everything per member
        sel_count, _ = jax.lax.cond(x > 0.5, lambda w, v: (w, v), lambda w, v: (w + 1, v), count, x)
        # while: independent predicate, a carry that takes x only after a few steps
        i, late, free = jax.lax.while_loop(lambda c: c[0] < 4, lambda c: (c[0] + 1, c[2] * x, c[2] + 1.0),
                                           (0, 0.0, 1.0))
        # while with a per-member predicate: every carry per member
        j, _ = jax.lax.while_loop(lambda c: c[1] < x + 3.0, lambda c: (c[0] + 1, c[1] + 1.0), (0, 0.0))
        # scan: an independent carry, a per-member one, a per-member output
        (steps, acc), ys = jax.lax.scan(lambda c, t: ((c[0] + 1, c[1] + x * t), t * x), (0, 0.0), jnp.arange(3.0))
        doubled = jax.jit(lambda w: w * 2)(window)
        return dict(window=window, y=y, sel_count=sel_count, i=i, late=late, free=free, j=j, steps=steps, acc=acc,
                    ys=ys, doubled=doubled)

    xs = jnp.asarray([0.2, 0.9, 0.4])
    out, _ = vmap_shared(fn, xs)
    batched = {k for k, v in out.items() if jnp.ndim(v) > jnp.ndim(jax.eval_shape(fn, xs[0])[k])}
    assert batched == {"y", "sel_count", "late", "j", "acc", "ys"}, batched
    plain = jax.vmap(fn)(xs)
    for k, v in plain.items():
        np.testing.assert_allclose(jnp.broadcast_to(out[k], v.shape), v, rtol=1e-6)


def test_one_member_is_stepped_without_vmap_so_a_cond_stays_a_branch():
    """One chain per device: a cond on the member's own value stays a branch (under
    vmap it becomes a select that runs both sides); states and outputs equal plain
    vmap's, and a uniform counter stays unbatched."""

    def start(batched, shared):
        (k,) = batched
        return {"count": jnp.zeros((), jnp.int32), "x": jax.random.normal(k) + shared}

    def step(k, state):
        x = jax.lax.cond(state["x"] > 0, lambda v: v - jax.random.uniform(k), lambda v: v + 1.0, state["x"])
        return {"count": state["count"] + 1, "x": x}, 2.0 * x

    shared = jnp.asarray(0.5)
    for n in (1, 3):
        keys = jax.random.split(jax.random.key(0), n)
        layout, own = vmap_states(start, (keys,), shared)
        stepper = StepProgram(step, layout, keys[0], own, shared)
        own = stepper.adopt(own, n)
        step_keys = jax.random.split(jax.random.key(1), n)
        eqns = jax.make_jaxpr(lambda o: stepper(step_keys, o, shared))(own).jaxpr.eqns
        assert ("cond" in {e.primitive.name for e in eqns}) == (n == 1), (n, eqns)
        (count, x), out = stepper(step_keys, own, shared)
        plain, plain_out = jax.vmap(step)(step_keys, jax.vmap(lambda k: start((k,), shared))(keys))
        assert count.shape == () and int(count) == 1
        np.testing.assert_array_equal(x, plain["x"])
        np.testing.assert_array_equal(out, plain_out)
