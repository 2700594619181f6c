"""Normalizing flows and flow guides: log-determinants against jax.jacfwd, inverses,
the flow density against the change of variables and against its integral, gradients
of log q at a fixed point against finite differences, the flow guide's GFI (scores,
weights, supports) against closed forms, a flow guide against mean-field on a banana,
and the errors.

Tolerances are for float32. Log-determinants, inverses and densities are exact up to
rounding, so they are compared to about 1e-5 relative (1e-4 absolute for sums of
several log terms). The statistical comparison states its margin in standard errors.
"""

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to
import pytest

import ppl
import vi
from vi._flows import _pull, _push

DIM = 3
KINDS = ["affine", "planar", "radial", "coupling-0", "coupling-1", "iaf", "iaf-reverse"]


def perturbed(tree, key, sd):
    """`tree` with Gaussian noise of scale `sd` on every float leaf (off the identity)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [x + sd * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def make(kind, dim, key, sd=0.5):
    build = {
        "affine": lambda: vi.DiagonalAffine(dim),
        "planar": lambda: vi.Planar(dim, key=key),
        "radial": lambda: vi.Radial(dim, key=key),
        "coupling-0": lambda: vi.AffineCoupling(dim, key=key, hidden=(8,), parity=0),
        "coupling-1": lambda: vi.AffineCoupling(dim, key=key, hidden=(8, 8), parity=1),
        "iaf": lambda: vi.IAF(dim, key=key, hidden=(8, 8)),
        "iaf-reverse": lambda: vi.IAF(dim, key=key, hidden=(8,), reverse=True),
    }[kind]
    return perturbed(build(), jax.random.fold_in(key, 1), sd)


def stack(dim, key, sd=0.3):
    """One layer of every kind, in an order that mixes them."""
    keys = jax.random.split(key, len(KINDS))
    return tuple(make(kind, dim, k, sd) for kind, k in zip(KINDS, keys))


# -- each layer: log|det J| and the inverse ------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_log_det_is_the_jacobian_determinant(kind):
    flow = make(kind, DIM, jax.random.key(3))
    zs = 1.5 * jax.random.normal(jax.random.key(4), (6, DIM))

    def check(z):
        y, log_det = flow.forward(z)
        sign, exact = jnp.linalg.slogdet(jax.jacfwd(lambda v: flow.forward(v)[0])(z))
        return log_det, sign, exact

    log_det, sign, exact = jax.jit(jax.vmap(check))(zs)
    np.testing.assert_array_equal(sign, 1.0)  # orientation preserving: |det| = det
    np.testing.assert_allclose(log_det, exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_inverse_undoes_forward(kind):
    flow = make(kind, DIM, jax.random.key(5))
    zs = 2.0 * jax.random.normal(jax.random.key(6), (6, DIM))
    ys, log_det = jax.vmap(flow.forward)(zs)
    back, log_det_back = jax.vmap(flow.inverse)(ys)
    np.testing.assert_allclose(back, zs, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(log_det_back, log_det, rtol=1e-5, atol=2e-5)


def test_planar_inverse_near_the_invertibility_boundary():
    # w.u very negative: w.u_hat = -1 + softplus(w.u) is just above -1, so the map
    # nearly folds where tanh' = 1; the reparameterization must keep it invertible.
    w = jnp.array([1.0, 0.5])
    flow = eqx.tree_at(lambda f: (f.u, f.w, f.b), vi.Planar(2, key=jax.random.key(0)),
                       (-6.0 * w, w, jnp.array(0.3)))
    assert float(flow.w @ flow._u_hat()) > -1.0
    zs = jnp.stack([jnp.linspace(-3, 3, 41), jnp.linspace(2, -2, 41)], axis=1)
    ys, log_det = jax.vmap(flow.forward)(zs)
    back, _ = jax.vmap(flow.inverse)(ys)
    assert bool(jnp.all(jnp.isfinite(log_det)))
    np.testing.assert_allclose(back, zs, atol=1e-4)


def test_radial_keeps_beta_above_minus_alpha():
    flow = eqx.tree_at(lambda f: f.raw_beta, vi.Radial(2, key=jax.random.key(0)), jnp.array(-30.0))
    alpha, beta = flow._alpha_beta()
    assert float(beta) >= -float(alpha)
    z = jnp.array([0.2, -0.1])
    y, log_det = flow.forward(z)
    np.testing.assert_allclose(flow.inverse(y)[0], z, atol=1e-5)
    assert bool(jnp.isfinite(log_det))


# -- the flow distribution ------------------------------------------------------------------


def test_log_prob_at_samples_is_the_change_of_variables():
    key = jax.random.key(8)

    @jax.jit
    def run(flows):
        q = vi.FlowDistribution(flows)
        x, log_q = q.sample_and_log_prob(key, (5,))
        # log N(eps) - log|det J| of the whole stack, J by jax.jacfwd
        eps = jax.random.normal(key, (5, DIM))
        jac = jax.vmap(jax.jacfwd(lambda e: _push(flows, e)[0]))(eps)
        exact = dist.Normal(0.0, 1.0).log_prob(eps).sum(-1) - jnp.linalg.slogdet(jac)[1]
        return x, log_q, q.sample(key, (5,)), exact, q.log_prob(x)

    x, log_q, again, exact, through_inverse = run(stack(DIM, jax.random.key(7)))
    assert x.shape == (5, DIM) and log_q.shape == (5,)
    np.testing.assert_allclose(again, x)  # sample is the same forward pass
    np.testing.assert_allclose(log_q, exact, rtol=1e-5, atol=1e-4)
    # log_prob inverts the layers and gives the same density
    np.testing.assert_allclose(through_inverse, log_q, rtol=1e-5, atol=1e-4)


def test_flow_density_integrates_to_one():
    # a 2-d density through every kind of layer, integrated on a grid (spacing 0.06 on
    # [-9, 9]^2, where the draws below stay): 1 to well within 1e-3 for a correct
    # log-determinant; a sign slip in any layer's log det moves it by far more.
    q = vi.FlowDistribution(stack(2, jax.random.key(9), sd=0.2))
    grid = jnp.linspace(-9.0, 9.0, 301)
    xx, yy = jnp.meshgrid(grid, grid)
    points = jnp.stack([xx.ravel(), yy.ravel()], axis=1)
    mass = float(jnp.sum(jnp.exp(jax.jit(q.log_prob)(points)))) * float(grid[1] - grid[0]) ** 2
    draws = jax.jit(q.sample, static_argnums=1)(jax.random.key(10), (20000,))
    assert float(jnp.max(jnp.abs(draws))) < 7.0
    assert abs(mass - 1.0) < 1e-3, mass


def test_log_prob_gradients_through_the_inverse():
    # the layers whose inverse is not a closed-form expression: Planar (root find), IAF
    # (D sequential passes); Radial's quadratic root; the others are plain autodiff
    keys = jax.random.split(jax.random.key(11), 4)
    flows = tuple(make(kind, DIM, k, 0.3) for kind, k in zip(["affine", "planar", "radial", "iaf-reverse"], keys))
    direction = perturbed(jax.tree.map(jnp.zeros_like, flows), jax.random.key(13), 1.0)
    norm = math.sqrt(sum(float(jnp.sum(d**2)) for d in jax.tree.leaves(direction)))
    direction = jax.tree.map(lambda d: d / norm, direction)
    eps = jax.random.normal(jax.random.key(14), (DIM,))
    h = 1e-2

    def log_q(params, x):
        return vi.FlowDistribution(params).log_prob(x)

    @jax.jit
    def run(flows):
        x = _push(flows, eps)[0]
        # 1. at a fixed x, the parameter gradient (implicit through Planar's root find,
        # autodiff through the other inverses) along `direction`, and central finite
        # differences of log q along it
        g = jax.grad(log_q)(flows, x)
        ad = sum(jnp.sum(a * d) for a, d in zip(jax.tree.leaves(g), jax.tree.leaves(direction)))
        moved = jax.vmap(lambda t: log_q(jax.tree.map(lambda p, d: p + t * d, flows, direction), x))(jnp.array([h, -h]))
        # 2. along the sampling path: d/dtheta log q(f(eps; theta); theta) through the
        # inverse, and d/dtheta [log N(eps) - log|det J(eps; theta)|] through the forward
        # pass alone (what the ELBO's pathwise gradient needs): equal
        through_inverse = jax.grad(lambda p: log_q(p, _push(p, eps)[0]))(flows)
        through_forward = jax.grad(lambda p: -_push(p, eps)[1])(flows)
        return ad, moved, through_inverse, through_forward

    ad, moved, through_inverse, through_forward = run(flows)
    fd = float(moved[0] - moved[1]) / (2 * h)
    assert abs(fd - float(ad)) < 2e-3 * (1 + abs(float(ad))), (fd, ad)
    for a, b in zip(jax.tree.leaves(through_inverse), jax.tree.leaves(through_forward)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_flow_distribution_at_a_site_of_a_written_guide():
    keys = jax.random.split(jax.random.key(15), 2)
    flows = (make("planar", 2, keys[0]), make("iaf", 2, keys[1]))

    @ppl.gen
    def guide(params):
        return ppl.sample("z", vi.FlowDistribution(params))

    tr = jax.jit(guide.simulate)(jax.random.key(16), (flows,))
    assert tr["z"].shape == (2,)
    # the core scores the draw with log_prob, through the inverse
    eps, log_det = jax.jit(_pull)(flows, tr["z"])
    np.testing.assert_allclose(tr.score, dist.Normal(0.0, 1.0).log_prob(eps).sum() - log_det, rtol=1e-5, atol=1e-5)
    # and vi.grad differentiates it as a reparameterized site
    objective = lambda key, p: -jnp.sum(vi.simulate(guide, key, (p,))["z"] ** 2)  # noqa: E731
    value, grads = jax.jit(vi.grad(objective))(jax.random.key(1), flows)
    assert jax.tree.structure(grads) == jax.tree.structure(flows)
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))


# -- the flow guide ---------------------------------------------------------------------------


@ppl.gen
def inner(scale):
    return ppl.sample("w", dist.Normal(0.0, scale))


@ppl.gen
def point(loc):
    return ppl.sample("e", dist.Normal(loc, 1.0))


@ppl.gen
def mixed():
    mu = ppl.sample("mu", dist.Normal(0.0, 2.0))
    sigma = ppl.sample("sigma", dist.HalfNormal(1.0).expand([3]).to_event(1))
    probs = ppl.sample("probs", dist.Dirichlet(jnp.ones(3)))
    w = ppl.sample("sub", inner, 1.5)
    es = ppl.sample("points", ppl.vmap(point, in_axes=(0,)), mu + jnp.zeros(4))
    ppl.sample("y", dist.Normal(mu + w + jnp.sum(sigma * probs), 1.0), obs=0.7)
    return es


MIXED_SHAPES = {("mu",): (), ("sigma",): (3,), ("probs",): (3,), ("sub", "w"): (), ("points", "e"): (4,)}


@pytest.mark.parametrize("flows", [pytest.param("iaf", marks=pytest.mark.slow), "planar"])
def test_flow_guide_sites_supports_and_scores(flows):
    guide, params = vi.flow_guide(mixed, flows=flows, key=jax.random.key(0), num_flows=2, hidden=(8,))
    assert params[0].dim == 1 + 3 + 2 + 1 + 4  # the simplex has 2 free coordinates
    tr = jax.jit(guide.simulate)(jax.random.key(1), (params,))
    assert {a: tr[a].shape for a in tr.choices.addresses()} == MIXED_SHAPES
    assert bool(jnp.all(tr["sigma"] > 0)) and abs(float(jnp.sum(tr["probs"])) - 1) < 1e-5
    # the forward-pass score equals the density through the inverse
    assess = jax.jit(lambda choices, p: guide.assess(choices, (p,))[0])
    np.testing.assert_allclose(assess(tr.choices, params), tr.score, rtol=1e-5, atol=1e-4)
    # the model scores the guide's choices (they cover its latent choices)
    assert bool(jnp.isfinite(jax.jit(lambda c: mixed.assess(c, ())[0])(tr.choices)))
    # generate: all sites given -> weight = score; none -> a draw, weight 0
    _, w = jax.jit(guide.generate)(jax.random.key(2), tr.choices, (params,))
    np.testing.assert_allclose(w, tr.score, rtol=1e-5, atol=1e-4)
    _, w0 = jax.jit(guide.generate)(jax.random.key(2), ppl.ChoiceMap(), (params,))
    assert float(w0) == 0.0
    # update to new params keeps the values: weight = new score - old score
    moved = perturbed(params, jax.random.key(3), 0.05)
    tr3, w, discard = jax.jit(guide.update)(jax.random.key(4), tr, ppl.ChoiceMap(), (moved,))
    np.testing.assert_allclose(w, assess(tr.choices, moved) - tr.score, rtol=1e-5, atol=1e-4)
    assert discard.is_empty and float(tr3["mu"]) == float(tr["mu"])
    # regenerate everything: a fresh draw, weight 0; project
    tr4, w = jax.jit(lambda k, t: guide.regenerate(k, t, ppl.Selection.all()))(jax.random.key(5), tr)
    assert float(w) == 0.0 and float(tr4["mu"]) != float(tr["mu"])
    assert float(guide.project(tr, ppl.Selection.all())) == float(tr.score)
    assert float(guide.project(tr, ppl.Selection.none())) == 0.0


def test_flow_guide_density_in_closed_form():
    # one positive site and a diagonal-affine flow: x = exp(loc + scale * eps) is
    # LogNormal(loc, scale); a vector real site gets Normal(loc, scale) per coordinate
    @ppl.gen
    def model():
        ppl.sample("rate", dist.Gamma(2.0, 1.0))
        ppl.sample("v", dist.Normal(0.0, 1.0).expand([2]).to_event(1))

    layer = eqx.tree_at(lambda f: (f.loc, f.raw_scale), vi.DiagonalAffine(3),
                        (jnp.array([0.4, -1.0, 2.0]), jnp.array([0.1, -0.5, 1.0])))
    guide, params = vi.flow_guide(model, flows=[layer])
    scale = jax.nn.softplus(layer.raw_scale)
    traces = jax.jit(jax.vmap(lambda k: guide.simulate(k, (params,))))(jax.random.split(jax.random.key(0), 8))
    exact = (dist.LogNormal(0.4, scale[0]).log_prob(traces["rate"])
             + dist.Normal(layer.loc[1:], scale[1:]).log_prob(traces["v"]).sum(-1))
    np.testing.assert_allclose(traces.score, exact, rtol=1e-5, atol=1e-5)


def test_elbo_gradient_is_the_pathwise_gradient():
    # vi.grad of the ELBO with a flow guide, one draw, equals autodiff of the same draw
    # written by hand: eps ~ N(0, I) with the guide's key, u = f(eps), x = (u0, exp(u1)).
    @ppl.gen
    def model():
        a = ppl.sample("a", dist.Normal(0.0, 1.0))
        ppl.sample("b", dist.LogNormal(a, 0.5))
        ppl.sample("y", dist.Normal(a, 1.0))

    guide, params = vi.flow_guide(model, (), {"y": 0.3}, "iaf", key=jax.random.key(0), num_flows=2, hidden=(8,))
    params = perturbed(params, jax.random.key(1), 0.2)
    key = jax.random.key(2)
    value, grads = jax.jit(vi.grad(vi.elbo(model, guide, (), {"y": 0.3})))(key, params)

    def by_hand(p):
        eps = jax.random.normal(key, (2,))
        u, log_det = _push(p, eps)
        log_q = dist.Normal(0.0, 1.0).log_prob(eps).sum() - log_det - u[1]  # b = exp(u1)
        a, b = u[0], jnp.exp(u[1])
        log_p = (dist.Normal(0.0, 1.0).log_prob(a) + dist.LogNormal(a, 0.5).log_prob(b)
                 + dist.Normal(a, 1.0).log_prob(0.3))
        return log_p - log_q

    exact_value, exact_grads = jax.value_and_grad(by_hand)(params)
    np.testing.assert_allclose(value, exact_value, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(exact_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# -- the flow guide with some sites given or selected --------------------------------------------
# A flow has no conditional of some sites given the others: the sites to draw come from the
# fixed proposal r (standard normals on their unconstrained coordinates through biject_to),
# and the weights must be the exact ones for r. The checks: weights against log q (assess)
# and log r computed here from numpyro's biject_to; the importance identity of generate;
# regenerate as a Metropolis-Hastings move that leaves q invariant.

MIXED_SUPPORTS = {("mu",): constraints.real, ("sigma",): constraints.positive, ("probs",): constraints.simplex,
                  ("sub", "w"): constraints.real, ("points", "e"): constraints.real}


def log_r(choices, addresses):
    """log density of the proposal r at the values of `addresses` in `choices`."""
    total = 0.0
    for a in addresses:
        t = biject_to(MIXED_SUPPORTS[a])
        x = jnp.asarray(choices[a])
        u = t.inv(x)
        total = total + dist.Normal(0.0, 1.0).log_prob(u).sum() - jnp.sum(t.log_abs_det_jacobian(u, x))
    return total


def test_flow_guide_partial_weights_are_exact():
    guide, params = vi.flow_guide(mixed, flows="coupling", key=jax.random.key(0), num_flows=2, hidden=(8,))
    params = perturbed(params, jax.random.key(1), 0.2)
    moved = perturbed(params, jax.random.key(4), 0.05)
    paths = tuple(MIXED_SUPPORTS)
    given = (("mu",), ("sub", "w"))  # generate's constraints
    change = (("sigma",), ("points", "e"))  # update's constraints, from another trace
    selected = (("probs",), ("points", "e"))  # regenerate's selection

    @jax.jit  # every call in one program: one compilation
    def run(params, moved):
        keys = jax.random.split(jax.random.key(2), 8)
        tr, other = guide.simulate(keys[0], (params,)), guide.simulate(keys[1], (params,))
        out = {"tr": tr, "other": other}
        gtr, w = guide.generate(keys[2], {p: tr[p] for p in given}, (params,))
        out["generate"] = (gtr, w, guide.assess(gtr.choices, (params,))[0], log_r(gtr.choices, tuple(
            p for p in paths if p not in given)))
        out["project"] = [guide.project(gtr, ppl.select(*s)) for s in (given, paths, ())]
        constraints_ = {p: other[p] for p in change}
        out["update"] = [guide.update(k, tr, constraints_, (moved,)) for k in keys[3:5]]
        out["update_assess"] = guide.assess(out["update"][0][0].choices, (moved,))[0]
        rtr, w = guide.regenerate(keys[5], tr, ppl.select(*selected))
        out["regenerate"] = (rtr, w, guide.assess(rtr.choices, (params,))[0],
                             log_r(tr.choices, selected), log_r(rtr.choices, selected))
        return out

    out = jax.device_get(run(params, moved))
    tr, other = out["tr"], out["other"]

    # generate: the given values kept, the others drawn from r; weight log q(x) - log r(x_free)
    gtr, w, log_q, log_r_free = out["generate"]
    same_structure(gtr, tr)
    for p in paths:
        assert np.all(gtr[p] == tr[p]) == (p in given)  # the free sites drawn afresh
    np.testing.assert_allclose(gtr.score, log_q, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(w, log_q - log_r_free, rtol=1e-5, atol=1e-4)
    # project: the weight generate gives the trace for the selected values
    project_given, project_all, project_none = out["project"]
    np.testing.assert_allclose(project_given, w, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(project_all, gtr.score, rtol=1e-6)
    assert project_none == 0.0

    # update: the given sites move, the others stay (nothing drawn); weight = score ratio
    (utr, w, discard), (utr2, w2, _) = out["update"]
    same_structure(utr, tr)
    assert w == w2 and utr2["mu"] == utr["mu"]  # deterministic: the key is not used
    for p in paths:
        np.testing.assert_array_equal(utr[p], other[p] if p in change else tr[p])
    np.testing.assert_allclose(w, out["update_assess"] - tr.score, rtol=1e-5, atol=1e-4)
    assert sorted(discard.addresses()) == sorted(change)
    np.testing.assert_array_equal(discard["sigma"], tr["sigma"])

    # regenerate: the selected sites from r, the others kept; weight = the MH log ratio
    rtr, w, log_q_new, log_r_old, log_r_new = out["regenerate"]
    same_structure(rtr, tr)
    for p in paths:
        assert np.all(rtr[p] == tr[p]) == (p not in selected)
    np.testing.assert_allclose(w, log_q_new - tr.score + log_r_old - log_r_new, rtol=1e-5, atol=1e-4)


@ppl.gen
def pair():
    a = ppl.sample("a", dist.Normal(0.0, 1.0))
    ppl.sample("s", dist.LogNormal(a, 0.5))


def mixing_pair_guide():
    """A flow guide for `pair` whose two coordinates depend on each other."""
    layers = (vi.DiagonalAffine(2, init_scale=0.6),
              vi.AffineCoupling(2, key=jax.random.key(0), hidden=(8,), parity=0),
              vi.AffineCoupling(2, key=jax.random.key(1), hidden=(8,), parity=1))
    guide, _ = vi.flow_guide(pair, flows=layers)
    return guide, perturbed(layers, jax.random.key(2), 0.3)


def mean_and_se(samples):
    samples = np.asarray(samples, dtype=np.float64)
    return samples.mean(0), samples.std(0, ddof=1) / math.sqrt(samples.shape[0])


def test_flow_guide_partial_generate_is_an_importance_sampler():
    # given a = 0.4, s is drawn from r and E_r[exp(weight)] = q(a = 0.4), q's marginal
    # density (exp(weight) = q(a, s) / r(s)): for a product flow in closed form, for a
    # mixing flow by quadrature over u = log s (q(a, s) ds = q(a, e^u) e^u du)
    keys = jax.random.split(jax.random.key(3), 20000)

    def importance_mean(guide, params):
        weigh = jax.jit(jax.vmap(lambda k: guide.generate(k, {"a": 0.4}, (params,))[1]))
        return mean_and_se(jnp.exp(weigh(keys)))

    layer = eqx.tree_at(lambda f: (f.loc, f.raw_scale), vi.DiagonalAffine(2),
                        (jnp.array([0.2, -0.3]), jnp.array([-0.4, 0.1])))
    guide, params = vi.flow_guide(pair, flows=[layer])
    mean, se = importance_mean(guide, params)
    exact = math.exp(dist.Normal(0.2, jax.nn.softplus(-0.4)).log_prob(0.4))
    assert abs(mean - exact) < 5 * se, (mean, exact, se)

    guide, params = mixing_pair_guide()
    u = np.linspace(-20.0, 20.0, 4001)
    log_joint = jax.jit(jax.vmap(lambda u: guide.assess({"a": 0.4, "s": jnp.exp(u)}, (params,))[0] + u))(u)
    exact = np.sum(np.exp(np.asarray(log_joint, np.float64))) * (u[1] - u[0])
    mean, se = importance_mean(guide, params)
    assert abs(mean - exact) < 5 * se, (mean, exact, se)


def test_flow_guide_partial_regenerate_leaves_q_invariant():
    # Chains started at exact draws of q, moved by MH steps that regenerate "a" alone and
    # accept with the returned log ratio, must still be distributed as q: E[h(x)] after
    # the steps equals E[h(x)] under fresh draws, to 5 SE of the difference. The planted
    # bug, a ratio without the proposal's terms (log q(x') - log q(x)), targets q r.
    guide, params = mixing_pair_guide()
    m, steps = 20000, 5
    start = jax.random.split(jax.random.key(5), m)
    fresh = jax.random.split(jax.random.key(6), m)

    def h(tr):
        a, log_s = tr["a"], jnp.log(tr["s"])
        return jnp.stack([a, a**2, a * log_s])

    def chain(k_start, k_moves, with_proposal_terms):
        def step(tr, k):
            k_move, k_accept = jax.random.split(k)
            new, w = guide.regenerate(k_move, tr, ppl.select("a"))
            if not with_proposal_terms:
                w = new.score - tr.score
            accept = jnp.log(jax.random.uniform(k_accept)) < w
            return jax.tree.map(lambda x, y: jnp.where(accept, x, y), new, tr), accept

        tr, accepted = jax.lax.scan(step, guide.simulate(k_start, (params,)), jax.random.split(k_moves, steps))
        return h(tr), jnp.mean(accepted)

    run = jax.jit(jax.vmap(chain, in_axes=(0, 0, None)), static_argnums=2)
    moved, rate = run(start, fresh, True)
    truth = jax.jit(jax.vmap(lambda k: h(guide.simulate(k, (params,)))))(jax.random.split(jax.random.key(7), m))
    (mean_moved, se_moved), (mean_truth, se_truth) = mean_and_se(moved), mean_and_se(truth)
    se = np.sqrt(se_moved**2 + se_truth**2)
    assert float(jnp.mean(rate)) > 0.2  # the chains do move
    assert np.all(np.abs(mean_moved - mean_truth) < 5 * se), (mean_moved, mean_truth, se)
    biased, _ = run(start, fresh, False)
    mean_biased, _ = mean_and_se(biased)
    assert np.max(np.abs(mean_biased - mean_truth) / se) > 10, (mean_biased, mean_truth, se)


def same_structure(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert (jnp.shape(x), jnp.result_type(x)) == (jnp.shape(y), jnp.result_type(y))


# -- flow vs mean-field on a banana ------------------------------------------------------------


@ppl.gen
def banana():
    # no observations: the target is the model itself, log Z = 0, so ELBO = -KL(q || p)
    a = ppl.sample("a", dist.Normal(0.0, 1.0))
    ppl.sample("b", dist.Normal(a**2, 0.5))


def fitted_elbo(guide, params, steps, seed):
    objective = vi.elbo(banana, guide, (), None, num_particles=16)
    schedule = optax.cosine_decay_schedule(1e-2, steps, alpha=0.1)
    params, _ = vi.fit(jax.random.key(seed), objective, params, optax.adam(schedule), steps, progress_bar=False)
    log_w, _ = vi.log_weights(banana, guide, (), None, jax.random.key(seed + 1), params, num_particles=20000)
    log_w = np.asarray(log_w, dtype=np.float64)
    return log_w.mean(), log_w.std() / math.sqrt(log_w.size)


@functools.lru_cache(maxsize=None)
def mean_field_elbo(steps):
    guide, params = vi.auto_normal(banana)
    return fitted_elbo(guide, params, steps, seed=1)


def banana_margin(flows, steps, num_flows):
    mf, mf_se = mean_field_elbo(steps)
    guide, params = vi.flow_guide(banana, flows=flows, key=jax.random.key(0), num_flows=num_flows, hidden=(32,))
    flow, flow_se = fitted_elbo(guide, params, steps, seed=1)
    return mf, mf_se, flow, flow_se


def best_mean_field_kl():
    """min over q(a) q(b) = N(m, s^2) N(n, t^2) of KL(q || p) for the banana, in closed
    form: ELBO = -E[a^2]/2 - 2 E[(b - a^2)^2] + log 2 + log s + log t + 1, with E[a^2] =
    m^2 + s^2 and E[(b - a^2)^2] = t^2 + (n - m^2 - s^2)^2 + 2 s^4 + 4 m^2 s^2."""
    from scipy.optimize import minimize

    def kl(p):
        m, log_s, n, log_t = p
        s2, t2 = math.exp(2 * log_s), math.exp(2 * log_t)
        square = t2 + (n - m * m - s2) ** 2 + 2 * s2 * s2 + 4 * m * m * s2
        return (m * m + s2) / 2 + 2 * square - math.log(2) - log_s - log_t - 1

    return minimize(kl, [0.0, 0.0, 1.0, 0.0], method="Nelder-Mead", options={"xatol": 1e-8, "fatol": 1e-10}).fun


# the coupling fit costs as much as the IAF one: CI runs the IAF case, -m slow both
@pytest.mark.parametrize("flows", ["iaf", pytest.param("coupling", marks=pytest.mark.slow)])
def test_flow_guide_beats_mean_field_on_a_banana(flows):
    # KL(q || p) = -ELBO here. No mean-field Gaussian gets below KL 0.5607 (closed form);
    # a flow can represent b | a ~ N(a^2, 0.5^2), and these reach KL 0.08 (IAF) and 0.13
    # (coupling) in 2000 steps. Each ELBO is estimated from 20000 independent draws
    # (s.e. about 0.005): the margin required over the fitted mean-field guide, 0.2
    # nats, is more than 10 combined standard errors, and the fitted mean-field guide
    # must sit at the closed-form optimum within 4 of its standard errors (false
    # alarm ~6e-5). With other initial keys the flows reach KL 0.07 to 0.13 too, but one
    # IAF start in four stalled at 0.47 within 2000 steps (still ahead of mean-field).
    best = best_mean_field_kl()
    assert abs(best - 0.5607) < 1e-3
    mf, mf_se, flow, flow_se = banana_margin(flows, 2000, num_flows=2)
    se = math.sqrt(mf_se**2 + flow_se**2)
    assert -mf > best - 4 * mf_se  # a mean-field guide cannot fit the curve
    assert flow - mf > max(0.2, 10 * se), (flows, mf, flow, se)
    assert -flow < best - 0.2


@pytest.mark.slow
@pytest.mark.parametrize("flows", ["planar", "radial"])
def test_planar_and_radial_beat_mean_field_on_a_banana(flows):
    mf, mf_se, flow, flow_se = banana_margin(flows, 3000, num_flows=8)
    se = math.sqrt(mf_se**2 + flow_se**2)
    assert flow - mf > 10 * se, (flows, mf, flow, se)


# -- errors -----------------------------------------------------------------------------------


def test_errors():
    key = jax.random.key(0)
    with pytest.raises(ppl.ArgumentError, match="dimension 3.*2 unconstrained coordinates"):
        vi.flow_guide(banana, flows=[vi.Planar(3, key=key)])
    with pytest.raises(ppl.ArgumentError, match="different dimensions"):
        vi.FlowDistribution([vi.Planar(2, key=key), vi.Radial(3, key=key)])
    with pytest.raises(ppl.ArgumentError, match="not a vi.Flow"):
        vi.FlowDistribution([vi.Planar(2, key=key), "radial"])
    with pytest.raises(ppl.ArgumentError, match="unknown flow 'maf'"):
        vi.flow_guide(banana, flows="maf", key=key)
    with pytest.raises(ppl.ArgumentError, match="pass key="):
        vi.flow_guide(banana, flows="iaf")
    with pytest.raises(ppl.ArgumentError, match="dim must be a positive int"):
        vi.IAF(0, key=key)
    with pytest.raises(ppl.ArgumentError, match="parity must be 0 or 1"):
        vi.AffineCoupling(2, key=key, parity=2)
    guide, params = vi.flow_guide(banana, flows="planar", key=key, num_flows=1)
    with pytest.raises(ppl.ArgumentError, match="dimension 3, but the guide's sites have 2"):
        guide.simulate(key, ((vi.Planar(3, key=key),),))
    with pytest.raises(ppl.UnknownAddressError, match="no value for 'b'; assess needs every site"):
        guide.assess({"a": 0.5}, (params,))
    with pytest.raises(ppl.UnknownAddressError, match="Did you mean 'a'"):
        guide.assess({"aa": 0.5, "b": 1.0}, (params,))
    with pytest.raises(ppl.UnknownAddressError, match="generate: 'c' names no site.*Did you mean"):
        guide.generate(key, {"c": 0.5}, (params,))
    with pytest.raises(ppl.ArgumentError, match=r"has shape \(2,\)"):
        guide.assess({"a": jnp.zeros(2), "b": 1.0}, (params,))
