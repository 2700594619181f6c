"""Automatic guides on the unconstrained space.

`auto_normal(model, model_args, observations)` and `auto_mvn(...)` survey the model's
latent choices (their addresses, shapes and supports, nested calls and combinators
included) and build a guide at the same addresses: a Gaussian on the real line pushed
into each site's support by numpyro's `biject_to(support)`, so `log q(x)` is the
Gaussian density of `u = t^-1(x)` plus the log-Jacobian, on the site's own space. Each
returns `(guide, params)`: the guide is a generative function called with `(params,
*model_args)`, and `params` a pytree of initial values to optimize.

- `auto_normal`: mean-field, `params[name] = {"loc": [n], "scale": [n]}` per site
  (`scale` through softplus).
- `auto_mvn`: one full-rank Gaussian over all latent coordinates, `params = {"loc":
  [D], "scale_tril": [D, D]}` (lower triangle; the diagonal through softplus). Sites are
  drawn one after another from the Gaussian's conditionals, so each keeps its address.

Draw from a fitted guide with `guide.simulate(key, (params, *model_args))`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro.distributions.transforms import ReshapeTransform, biject_to

import ppl
from ppl.extend import format_address

__all__ = ["auto_normal", "auto_mvn"]


class _Supports(ppl.SiteHandler):
    """Records each latent site's support (a static fact)."""

    def __init__(self):
        self.supports = {}

    def process(self, site):
        if site.kind == "latent":
            d = site.fn
            self.supports[site.path] = getattr(d, "base", d).support
        return site


def survey(gen_fn, args: tuple, constraints=None) -> dict:
    """{path: (ShapeDtypeStruct, support)} of every random choice of `gen_fn` run
    abstractly (no computation; `args` closed over, so static ints stay static).
    Choices fixed by `constraints` are listed too."""
    h = _Supports()
    handled = ppl.handle(gen_fn, h)
    box = []

    def run(key):
        if constraints is None or constraints.is_empty:
            tr = handled.simulate(key, args)
        else:
            tr, _ = handled.generate(key, constraints, args)
        box.append({a: jax.ShapeDtypeStruct(jnp.shape(v), jnp.result_type(v)) for a, v in tr.choices.flat_items()})
        return 0.0

    jax.eval_shape(run, jax.random.key(0))
    return {path: (sd, h.supports.get(path)) for path, sd in box[0].items()}


def _latents(model, model_args, observations, where):
    """[(path, shape, dtype, support)] of the model's latent choices, in a fixed order."""
    if not isinstance(model, ppl.GenerativeFunction):
        raise ppl.ArgumentError(f"{where}: model must be a generative function, got {type(model).__name__}.")
    if not isinstance(model_args, tuple):
        raise ppl.ArgumentError(f"{where}: model_args must be a tuple, got {type(model_args).__name__}.")
    obs = ppl.ChoiceMap.of(observations) if observations is not None else ppl.ChoiceMap()
    observed = set(obs.addresses())
    out = []
    for path, (sd, support) in survey(model, model_args, obs).items():
        if path in observed:
            continue
        if support.is_discrete:
            raise ppl.ArgumentError(
                f"{where}: the model's latent choice {format_address(path)} is discrete (support "
                f"{support}); an automatic Gaussian guide covers continuous sites. Write a guide with "
                "a discrete site there (vi.enum / vi.mvd / vi.reinforce)."
            )
        try:
            transform = biject_to(support)
        except Exception as e:  # a support whose bounds are other latent values
            raise ppl.ArgumentError(
                f"{where}: the support of {format_address(path)} ({support}) has no fixed bijection "
                "to the real line (its bounds depend on other values); write a guide for it."
            ) from e
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(vars(transform))):
            raise ppl.ArgumentError(
                f"{where}: the support of {format_address(path)} ({support}) depends on other random "
                "values, so an automatic guide cannot fix its bijection; write a guide for it."
            )
        out.append((path, tuple(sd.shape), sd.dtype, transform))
    if not out:
        raise ppl.ArgumentError(f"{where}: the model has no latent choice left once the observations are given.")
    return out


def _site_dist(base_mvn_or_normal, shape, transform, unconstrained_size):
    """The site's distribution: a Gaussian over `unconstrained_size` reals, reshaped to
    the site's unconstrained shape and mapped into its support."""
    u_shape = tuple(transform.inverse_shape(shape))
    parts = [ReshapeTransform(u_shape, (unconstrained_size,))] if u_shape != (unconstrained_size,) else []
    return dist.TransformedDistribution(base_mvn_or_normal, parts + [transform])


def _tree(sites):
    """Nest the sites by path: {address: subtree or index}."""
    root: dict = {}
    for i, (path, *_rest) in enumerate(sites):
        node = root
        for a in path[:-1]:
            node = node.setdefault(a, {})
        node[path[-1]] = i
    return root


def _walk(tree, leaf, params, state):
    """Inside a DSL body: sample each site of `tree` (leaf i through `leaf(i, params,
    state)`), nested addresses through the prebuilt nested functions; `state` (an
    array) is threaded through in order."""
    for address, sub in tree.items():
        if isinstance(sub, tuple):  # (subtree, its generative function)
            state = ppl.sample(address, sub[1], params, state)
        else:
            d, update = leaf(sub, params, state)
            state = update(ppl.sample(address, d), state)
    return state


def _prepare(tree, leaf, name):
    """Replace each subtree by (subtree, generative function walking it), bottom up."""
    out = {}
    for address, sub in tree.items():
        if isinstance(sub, dict):
            inner = _prepare(sub, leaf, f"{name}.{address}")

            def body(params, state, _t=inner):
                return _walk(_t, leaf, params, state)

            body.__name__ = f"{name}.{address}"
            out[address] = (inner, ppl.gen(body))
        else:
            out[address] = sub
    return out


def _guide(sites, leaf, name, init_state):
    tree = _prepare(_tree(sites), leaf, name)

    def guide(params, *model_args):
        _walk(tree, leaf, params, init_state())

    guide.__name__ = name
    return ppl.gen(guide)


def _names(sites):
    return ["/".join(path) for path, *_ in sites]


def auto_normal(model, model_args: tuple = (), observations=None, init_scale: float = 0.1):
    """A mean-field Gaussian guide on the unconstrained space: `(guide, params)`.

    `params[name]` holds `loc` and `scale` (before softplus) of the site's real-line
    coordinates, `name` the site's address joined with "/". Initial locations are 0
    (the bijection's image of 0: 1 for a positive site, the centre of a simplex),
    initial scales `init_scale`.
    """
    sites = _latents(model, model_args, observations, "vi.auto_normal")
    names = _names(sites)
    sizes = [math.prod(transform.inverse_shape(shape)) for _, shape, _, transform in sites]
    raw0 = math.log(math.expm1(init_scale))
    params = {n: {"loc": jnp.zeros(k), "scale": jnp.full(k, raw0)} for n, k in zip(names, sizes)}

    def leaf(i, params, state):
        _, shape, _, transform = sites[i]
        p = params[names[i]]
        base = dist.Normal(p["loc"], jax.nn.softplus(p["scale"])).to_event(1)
        return _site_dist(base, shape, transform, sizes[i]), lambda value, s: s

    return _guide(sites, leaf, f"auto_normal({model.__name__})", lambda: jnp.zeros(())), params


def auto_mvn(model, model_args: tuple = (), observations=None, init_scale: float = 0.1):
    """A full-rank Gaussian guide on the unconstrained space: `(guide, params)`.

    `params = {"loc": [D], "scale_tril": [D, D]}` over all D real-line coordinates of the
    latent choices (in the order of `model`'s trace); the covariance is `L L^T` with `L`
    the lower triangle of `scale_tril`, its diagonal through softplus.
    """
    sites = _latents(model, model_args, observations, "vi.auto_mvn")
    sizes = [math.prod(transform.inverse_shape(shape)) for _, shape, _, transform in sites]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    total = sum(sizes)
    raw0 = math.log(math.expm1(init_scale))
    params = {"loc": jnp.zeros(total), "scale_tril": jnp.eye(total) * raw0}

    def tril(params):
        raw = params["scale_tril"]
        return jnp.tril(raw, -1) + jnp.diag(jax.nn.softplus(jnp.diag(raw)))

    def leaf(i, params, eps):
        _, shape, _, transform = sites[i]
        o, k = offsets[i], sizes[i]
        L = tril(params)
        # u_i | u_<i = loc_i + L[i, <i] eps_<i + L[i, i] eps_i
        mean = params["loc"][o : o + k] + L[o : o + k, :o] @ eps[:o]
        block = L[o : o + k, o : o + k]
        base = dist.MultivariateNormal(mean, scale_tril=block)
        t = _site_dist(base, shape, transform, k)

        def update(value, eps):
            u = jnp.reshape(transform.inv(value), (k,))
            e = jax.scipy.linalg.solve_triangular(block, u - mean, lower=True)
            return eps.at[o : o + k].set(e)

        return t, update

    return _guide(sites, leaf, f"auto_mvn({model.__name__})", lambda: jnp.zeros(total)), params
