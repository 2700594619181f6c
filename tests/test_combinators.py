"""vmap, scan, switch and mask combinators: densities, GFI methods, and their laws."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from conftest import assert_close

import ppl


@ppl.gen
def point(x, slope):
    return ppl.sample("y", dist.Normal(slope * x, 0.5))


@ppl.gen
def line(xs):
    slope = ppl.sample("slope", dist.Normal(0.0, 1.0))
    return ppl.sample("points", ppl.vmap(point, in_axes=(0, None)), xs, slope)


XS = jnp.linspace(-1.0, 1.0, 6)


def test_vmap_equals_a_loop_of_calls(key):
    tr = line.simulate(key, (XS,))
    ys = tr["points", "y"]
    assert ys.shape == (6,)
    loop = dist.Normal(0.0, 1.0).log_prob(tr["slope"]) + sum(
        point.assess({"y": ys[i]}, (XS[i], tr["slope"]))[0] for i in range(6)
    )
    assert_close(tr.score, loop)
    assert_close(line.assess(tr.choices, (XS,))[0], tr.score)
    # constraints are stacked along the mapped axis
    gtr, w = line.generate(key, {"points": {"y": jnp.zeros(6)}}, (XS,))
    assert_close(w, dist.Normal(gtr["slope"] * XS, 0.5).log_prob(0.0).sum())
    utr, uw, _ = line.update(key, gtr, {"slope": 0.3}, (XS,))
    assert_close(uw, utr.score - gtr.score)
    with pytest.raises(ppl.ObservationError, match="mapped axis first"):
        line.generate(key, {"points": {"y": jnp.zeros(5)}}, (XS,))


def test_vmap_regenerate_inside(key):
    tr = line.simulate(key, (XS,))
    rtr, w = line.regenerate(key, tr, ppl.select(("points", "y")))
    assert_close(rtr["slope"], tr["slope"])
    assert not jnp.allclose(rtr["points", "y"], tr["points", "y"])
    assert_close(w, 0.0)  # only selected sites changed: the MH ratio of a prior move is 1


@ppl.gen
def walk_step(z, x):
    z = ppl.sample("z", dist.Normal(0.9 * z + x, 1.0))
    ppl.sample("obs", dist.Normal(z, 0.5))
    return z, z


def _unrolled(T):
    @ppl.gen
    def unrolled(z0, xs):
        z = z0
        for t in range(T):
            z = ppl.sample(f"z_{t}", dist.Normal(0.9 * z + xs[t], 1.0))
            ppl.sample(f"obs_{t}", dist.Normal(z, 0.5))
        return z

    return unrolled


def test_scan_equals_its_unrolled_loop(key):
    T = 5
    xs = jnp.arange(T, dtype=jnp.float32) * 0.1
    model = ppl.scan(walk_step, length=T)
    tr = model.simulate(key, (0.0, xs))
    final, ys = tr.retval
    assert tr["z"].shape == (T,) and ys.shape == (T,)
    assert_close(final, tr["z"][-1])
    flat = {f"z_{t}": tr["z"][t] for t in range(T)} | {f"obs_{t}": tr["obs"][t] for t in range(T)}
    lp_loop, last = _unrolled(T).assess(flat, (0.0, xs))
    assert_close(tr.score, lp_loop, rtol=1e-5)
    assert_close(model.assess(tr.choices, (0.0, xs))[0], tr.score, rtol=1e-5)
    # generate and update weights
    gtr, w = model.generate(key, {"obs": jnp.ones(T)}, (0.0, xs))
    assert_close(w, dist.Normal(gtr["z"], 0.5).log_prob(1.0).sum(), rtol=1e-5)
    utr, uw, discard = model.update(key, gtr, {"z": jnp.zeros(T)}, (0.0, xs))
    assert_close(uw, utr.score - gtr.score, rtol=1e-4)
    assert_close(discard["z"], gtr["z"])
    # regenerate one site of every step: obs kept
    rtr, rw = model.regenerate(key, gtr, ppl.select("z"))
    assert_close(rtr["obs"], gtr["obs"])
    expected = (dist.Normal(rtr["z"], 0.5).log_prob(1.0) - dist.Normal(gtr["z"], 0.5).log_prob(1.0)).sum()
    assert_close(rw, expected, rtol=1e-4, atol=1e-4)


def test_scan_without_xs_and_bad_kernels(key):
    @ppl.gen
    def ar(z, _):
        z = ppl.sample("z", dist.Normal(z, 1.0))
        return z, None

    tr = ppl.scan(ar, length=4).simulate(key, (0.0, None))
    assert tr["z"].shape == (4,)
    with pytest.raises(ppl.ArgumentError, match="length"):
        ppl.scan(ar).simulate(key, (0.0, None))

    @ppl.gen
    def bad(z, _):
        return ppl.sample("z", dist.Normal(z, 1.0))

    with pytest.raises(ppl.ArgumentError, match="pair"):
        ppl.scan(bad, length=3).simulate(key, (0.0, None))

    @ppl.gen
    def grows(z, _):
        z = ppl.sample("z", dist.Normal(z, 1.0))
        return jnp.stack([z, z]), z

    with pytest.raises(ppl.ArgumentError, match="same structure"):
        ppl.scan(grows, length=3).simulate(key, (0.0, None))


@ppl.gen
def narrow(mu):
    return ppl.sample("x", dist.Normal(mu, 1.0))


@ppl.gen
def wide(mu):
    x = ppl.sample("x", dist.Normal(mu, 10.0))
    ppl.sample("extra", dist.Normal(0.0, 1.0))
    return x


@ppl.gen
def mixture():
    k = ppl.sample("k", dist.Categorical(jnp.array([0.3, 0.7])))
    return ppl.sample("component", ppl.switch(narrow, wide), k, 1.0)


def test_switch_scores_only_the_chosen_branch(key):
    for seed in range(4):
        tr = mixture.simulate(jax.random.key(seed), ())
        k, x = int(tr["k"]), tr["component", "x"]
        prior = jnp.log(jnp.array([0.3, 0.7]))[k]
        if k == 0:
            expected = prior + dist.Normal(1.0, 1.0).log_prob(x)
        else:
            expected = prior + dist.Normal(1.0, 10.0).log_prob(x) + dist.Normal(0.0, 1.0).log_prob(
                tr["component", "extra"]
            )
        assert_close(tr.score, expected)
        assert_close(mixture.assess(tr.choices, ())[0], tr.score)
    # jit and vmap keep a static shape with the index traced
    batch = jax.jit(jax.vmap(mixture.simulate, in_axes=(0, None)))(jax.random.split(key, 8), ())
    assert batch["component", "x"].shape == (8,)


def test_switch_update_across_branches(key):
    tr, _ = mixture.generate(key, {"k": 0, ("component", "x"): 2.0}, ())
    utr, w, _ = mixture.update(key, tr, {"k": 1}, ())
    # new branch drawn from its prior with the constraint on x carried only if given:
    assert int(utr["k"]) == 1
    assert_close(w, utr.score - tr.score - dist.Normal(0.0, 1.0).log_prob(utr["component", "extra"])
                 - dist.Normal(1.0, 10.0).log_prob(utr["component", "x"]), rtol=1e-4, atol=1e-4)
    same, w_same, _ = mixture.update(key, tr, {("component", "x"): 1.5}, ())
    assert_close(w_same, same.score - tr.score, rtol=1e-5)
    with pytest.raises(ppl.UnknownAddressError, match="any branch"):
        mixture.generate(key, {("component", "nope"): 1.0}, ())


def test_mask_switches_contribution_off(key):
    masked = ppl.mask(narrow)
    on = masked.simulate(key, (True, 0.0))
    off = masked.simulate(key, (False, 0.0))
    assert_close(on.score, dist.Normal(0.0, 1.0).log_prob(on["x"]))
    assert off.score == 0.0
    assert masked.assess({"x": 3.0}, (False, 0.0))[0] == 0.0
    _, w = masked.generate(key, {"x": 3.0}, (False, 0.0))
    assert w == 0.0
    _, w_on = masked.generate(key, {"x": 3.0}, (True, 0.0))
    assert_close(w_on, dist.Normal(0.0, 1.0).log_prob(3.0))
    # turning a particle off removes its old score from the weight
    _, w_off, _ = masked.update(key, on, {}, (False, 0.0))
    assert_close(w_off, -on.score)

    # inside a scan: steps after `done` contribute nothing
    @ppl.gen
    def step(t, stop_at):
        ppl.sample("x", ppl.mask(narrow), t < stop_at, 0.0)
        return t + 1, None

    tr = ppl.scan(step, length=5).simulate(key, (0, jnp.full((5,), 2)))
    assert_close(tr.score, dist.Normal(0.0, 1.0).log_prob(tr["x", "x"][:2]).sum())


def test_scan_carries_a_prng_key_and_python_scalars(key):
    @ppl.gen
    def keyed(carry, _):
        k, total = carry
        k, sub = jax.random.split(k)
        x = ppl.sample("x", dist.Normal(jax.random.normal(sub), 1.0))
        return (k, total + x), x

    tr = ppl.scan(keyed, length=3).simulate(key, ((jax.random.key(5), 0.0), None))
    (final_key, total), xs = tr.retval
    assert jax.dtypes.issubdtype(final_key.dtype, jax.dtypes.prng_key)
    assert_close(total, xs.sum())


def test_vmap_in_axes_may_be_a_prefix_of_an_argument(key):
    @ppl.gen
    def shifted(data):
        return ppl.sample("y", dist.Normal(data["x"] + data["offset"]["a"] * data["offset"]["b"], 1.0))

    # 'offset' (unmapped) holds two leaves, so a leaf-by-leaf pairing of axes would misalign
    data = {"x": jnp.arange(4.0), "offset": {"a": jnp.array(2.0), "b": jnp.array(0.5)}}
    tr = ppl.vmap(shifted, in_axes=({"x": 0, "offset": None},)).simulate(key, (data,))
    assert tr["y"].shape == (4,)
    assert_close(tr.score, dist.Normal(jnp.arange(4.0) + 1.0, 1.0).log_prob(tr["y"]).sum())


def test_scan_advanced_one_step_at_a_time_reproduces_generate(key):
    """A batch of particles stepped through the scan (what a particle filter does) gives
    the same traces and weights as `generate` of the whole scan, bit for bit."""

    @ppl.gen
    def lg_step(z, _):
        z = ppl.sample("z", dist.Normal(0.9 * z, 1.0))
        ppl.sample("y", dist.Normal(z, 0.5))
        return z, z

    T, n = 6, 5
    chain = ppl.scan(lg_step, length=T)
    ys = jnp.sin(jnp.arange(T, dtype=jnp.float32))

    def whole(i):
        return chain.generate(ppl.particle_key(key, i), {"y": ys}, (0.0, None))

    def stepped(i):
        k = ppl.particle_key(key, i)

        def body(z, t_y):
            t, y = t_y
            tr, w, z = chain.step(k, t, z, None, {"y": y})
            return z, (tr, w)

        _, (steps, ws) = jax.lax.scan(body, jnp.float32(0.0), (jnp.arange(T), ys))
        return chain.assemble((0.0, None), steps), jnp.sum(ws)

    (tr_a, w_a), (tr_b, w_b) = jax.vmap(whole)(jnp.arange(n)), jax.vmap(stepped)(jnp.arange(n))
    np.testing.assert_array_equal(tr_a["z"], tr_b["z"])
    assert_close(w_a, w_b)
    assert_close(tr_a.score, tr_b.score)
    assert_close(tr_a.retval[0], tr_b.retval[0])
    # the cost of a step does not grow with the length of the scan
    sizes = [len(jax.make_jaxpr(lambda: ppl.scan(lg_step, length=L).step(key, 3, 0.0, None, {"y": 1.0}))().eqns)
             for L in (10, 1000)]
    assert sizes[0] == sizes[1]
    with pytest.raises(ppl.ArgumentError, match="stacked over 6 steps"):
        chain.assemble((0.0, None), jax.tree.map(lambda x: x[:3], tr_b.inner))


def test_stacked_dsl_traces_keep_one_array_per_site(key):
    """A vmap (or scan) of a DSL function stores each site's values and log densities, and
    no second per-element score array: 100 observed points under 50 particles keep one
    [50, 100] log-density array, and every method still sees the element scores."""

    @ppl.gen
    def point(x, slope):
        return ppl.sample("y", dist.Normal(slope * x, 1.0))

    @ppl.gen
    def model(xs):
        slope = ppl.sample("slope", dist.Normal(0.0, 1.0))
        return ppl.sample("points", ppl.vmap(point, in_axes=(0, None)), xs, slope)

    xs = jnp.linspace(-1.0, 1.0, 100)
    ys = 0.5 * xs
    trs, _ = jax.vmap(lambda k: model.generate(k, {("points", "y"): ys}, (xs,)))(jax.random.split(key, 50))
    # jax.vmap broadcasts the shared leaves (xs, ys); count the ones that vary by particle
    per_point = [leaf for leaf in jax.tree.leaves(trs) if leaf.shape == (50, 100) and jnp.any(leaf != leaf[0])]
    assert len(per_point) == 1
    tr = jax.tree.map(lambda leaf: leaf[0], trs)
    exact = dist.Normal(0.0, 1.0).log_prob(tr["slope"]) + jnp.sum(dist.Normal(tr["slope"] * xs, 1.0).log_prob(ys))
    assert_close(tr.score, exact)
    # update moves the slope: every element's old score enters the weight
    new, w, _ = model.update(key, tr, {"slope": 1.0}, (xs,))
    new_exact = dist.Normal(0.0, 1.0).log_prob(1.0) + jnp.sum(dist.Normal(xs, 1.0).log_prob(ys))
    assert_close(w, new_exact - exact, rtol=1e-5)
    assert_close(new.score, new_exact)


def test_scan_update_reruns_only_the_steps_that_changed(key):
    """Changing one observation of a 40-step scan re-runs that step alone; moving one
    latent re-runs its step and the next (whose carry changed), and the weights equal the
    exact density differences. Under jit and under a batch of particles (where the cond
    becomes a select) the results are the same."""
    runs = []

    @ppl.gen
    def lg_step(z, _):
        jax.debug.callback(lambda: runs.append(1))
        z = ppl.sample("z", dist.Normal(0.9 * z, 1.0))
        ppl.sample("y", dist.Normal(z, 0.5))
        return z, z

    T = 40
    chain = ppl.scan(lg_step, length=T)
    ys = jnp.sin(jnp.arange(T, dtype=jnp.float32))
    tr, _ = chain.generate(key, {"y": ys}, (0.0, None))
    zs = tr["z"]

    def log_joint(zs, ys):
        prev = jnp.concatenate([jnp.zeros(1), zs[:-1]])
        return jnp.sum(dist.Normal(0.9 * prev, 1.0).log_prob(zs) + dist.Normal(zs, 0.5).log_prob(ys))

    ys2 = ys.at[7].set(3.0)
    runs.clear()
    new, w, discard = chain.update(key, tr, {"y": ys2}, (0.0, None))
    jax.block_until_ready(w)
    assert len(runs) == 1
    assert_close(w, log_joint(zs, ys2) - log_joint(zs, ys), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(discard["y"], ys)
    np.testing.assert_array_equal(new["z"], zs)

    zs2 = zs.at[3].set(1.5)
    runs.clear()
    new, w, discard = chain.update(key, tr, {"z": zs2}, (0.0, None))
    jax.block_until_ready(w)
    assert len(runs) == 2
    assert_close(w, log_joint(zs2, ys) - log_joint(zs, ys), rtol=1e-4, atol=1e-4)
    assert_close(new.score, log_joint(zs2, ys), rtol=1e-5)
    np.testing.assert_array_equal(discard["z"], zs)

    jitted = jax.jit(lambda tr, ys2: chain.update(key, tr, {"y": ys2}, (0.0, None))[1])
    assert_close(jitted(tr, ys2), log_joint(zs, ys2) - log_joint(zs, ys), rtol=1e-4, atol=1e-4)
    # a batch of particles, each changing a different step
    trs = jax.vmap(lambda k: chain.generate(k, {"y": ys}, (0.0, None))[0])(jax.random.split(key, 3))
    moved = jnp.stack([trs["z"][i].at[5 * i].set(0.0) for i in range(3)])
    _, ws, _ = jax.vmap(lambda t, z: chain.update(key, t, {"z": z}, (0.0, None)))(trs, moved)
    exact = jnp.stack([log_joint(moved[i], ys) - log_joint(trs["z"][i], ys) for i in range(3)])
    assert_close(ws, exact, rtol=1e-4, atol=1e-4)
