"""Normalizing flows, the flow distribution, and the flow guide.

A flow is an equinox module holding a bijection `f` of R^D and its log-Jacobian:
`forward(z) -> (f(z), log|det df/dz|)` and `inverse(y) -> (z, log|det df/dz| at z)`,
both for one vector of shape [D] (`jax.vmap` them for a batch). The layers:

- `DiagonalAffine`: `loc + scale * z`, the Gaussian base of Rezende and Mohamed's q0.
- `Planar` (Rezende and Mohamed 2015): `z + u_hat tanh(w.z + b)`, with `u_hat` the
  paper's reparameterization of `u` so that `w.u_hat > -1` (invertible for every
  parameter value).
- `Radial` (same paper): `z + beta (z - z0) / (alpha + |z - z0|)`, `alpha = softplus`,
  `beta = -alpha + softplus` so that `beta >= -alpha` (invertible).
- `AffineCoupling` (RealNVP): the coordinates of one parity pass through and condition
  an MLP giving a shift and a log-scale of the others; alternate `parity` between layers.
- `IAF` (Kingma et al. 2016): `y = mu(z) + exp(s(z)) * z` with `mu_i`, `s_i` depending
  on `z_<i` only, through a MADE masked MLP; the forward pass is one network
  evaluation, the inverse D of them. Alternate `reverse` between layers.

Log-scales are soft-clipped to (-3, 3) per layer, and the last layer of every network
starts at zero, so coupling and IAF layers start as the identity.

Inverses and their accuracy. Radial, coupling and IAF invert exactly: radial by the
positive root of a quadratic in the radius, coupling by one network evaluation, IAF by
D sequential evaluations (after pass k the first k coordinates in the layer's order are
exact), all differentiable by ordinary autodiff. Planar has no closed-form inverse, but
it is one scalar equation: with `a = w.z`, `w.y = a + (w.u_hat) tanh(a + b)`, strictly
increasing in `a` and with its root within `|w.u_hat|` of `w.y`. The root is bracketed
and bisected (no gradient) to float spacing; a zero-valued Newton correction at the
root carries the gradient: its derivative in `y` and the parameters is the
implicit-function-theorem derivative `-dg/dtheta / (dg/da)`, exact at the root. The
error of `log q(x)` and of its gradient is that of float32 rounding: in the tests,
inverses and log-determinants (against `jax.jacfwd`) agree to about 1e-5, gradients
through the inverse equal those through the forward pass to 1e-4, and match central
finite differences within their own error (2e-3).

`FlowDistribution(flows)` is the pushforward of N(0, I_D) through the layers in order,
a numpyro distribution over R^D: `sample` is the forward pass (reparameterized: draws
carry the parameters' gradient), `log_prob(x)` the change of variables at the inverse,
`sample_and_log_prob` both from one forward pass with no inverse. Use it at a site of
a hand-written guide (the core scores a draw with `log_prob`, so through the inverse).

`flow_guide(model, ...)`: one flow over the concatenated unconstrained coordinates of
all the model's latent choices, each piece pushed into its site's support by
numpyro's `biject_to`, sites at the model's own addresses. A flow that mixes
coordinates has no tractable conditional of one site given the others, so the sites
cannot be drawn one after another as `auto_mvn` does; the guide is a generative
function of its own that draws all sites jointly. `simulate` scores the draw from the
forward pass (`log q(x) = log N(eps) - sum log|det J| - log|det dt/du|`, no inverse);
`assess`, `generate` / `update` with given values, score through the inverse. Its
sites are reparameterized and do not pass through site handlers.

Some sites given or selected. A flow has no tractable conditional of some sites given
the others, so the guide draws such sites from a fixed internal proposal `r` instead:
independent standard normals on their unconstrained coordinates, pushed through
`biject_to` (`log r(x) = log N(t^-1(x); 0, I) - log|det dt/du|`). The GFI weights are
then the exact ones for that proposal (`x` the trace's values, `F` the drawn sites):

- `generate(constraints)`: `log q(x) - log r(x_F)`, the importance weight, so that
  `E_r[exp(weight)] = q(x_given)` (the flow's marginal). Nothing given: a draw from `q`
  itself, weight 0; everything given: `log q(x)`.
- `update(trace, constraints)`: the given sites take their values, the others keep
  theirs (nothing is drawn): `log q_new(x') - log q_old(x)`; the discard holds the
  replaced values.
- `regenerate(trace, selection)`: the selected sites drawn from `r`, the others kept:
  the Metropolis-Hastings log ratio `log q(x') - log q(x) + log r(x_S) - log r(x'_S)`.
  All selected: a fresh draw from `q`, ratio 1 (weight 0).
- `project(trace, selection)`: what `generate` would weigh the trace with, given the
  selected values and having drawn the others: `log q(x) - log r(x_unselected)` (all
  selected: the score; none: 0).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions import constraints

import ppl
from ppl.extend import format_address, suggest

from ._guides import _latents

__all__ = [
    "Flow", "DiagonalAffine", "Planar", "Radial", "AffineCoupling", "IAF",
    "FlowDistribution", "flow_guide",
]

_LOG_SCALE_LIMIT = 3.0
_BISECTIONS = 50
sg = jax.lax.stop_gradient


# ----------------------------------------------------------------------------------------
# Flows
# ----------------------------------------------------------------------------------------


class Flow(eqx.Module):
    """Base class: a bijection of R^D with its log-Jacobian, for one vector `[D]`.

    Subclasses define `dim` and the two methods below.
    """

    def forward(self, z):
        """`(f(z), log|det df/dz|)`."""
        raise NotImplementedError

    def inverse(self, y):
        """`(z, log|det df/dz| at z)` with `f(z) = y`."""
        raise NotImplementedError


class DiagonalAffine(Flow):
    """`y = loc + softplus(raw_scale) * z`, elementwise.

    >>> flow = vi.DiagonalAffine(2, init_scale=0.5)
    >>> y, log_det = flow.forward(jnp.array([1.0, -2.0]))
    >>> [round(v, 4) for v in y.tolist()], round(float(log_det), 4)     # 2 log 0.5
    ([0.5, -1.0], -1.3863)
    """

    loc: jax.Array
    raw_scale: jax.Array
    dim: int = eqx.field(static=True)

    def __init__(self, dim: int, init_scale: float = 1.0):
        self.dim = _check_dim(dim, "vi.DiagonalAffine")
        self.loc = jnp.zeros(self.dim)
        self.raw_scale = jnp.full(self.dim, _softplus_inverse(init_scale, "vi.DiagonalAffine"))

    def forward(self, z):
        scale = jax.nn.softplus(self.raw_scale)
        return self.loc + scale * z, jnp.sum(jnp.log(scale))

    def inverse(self, y):
        scale = jax.nn.softplus(self.raw_scale)
        return (y - self.loc) / scale, jnp.sum(jnp.log(scale))


class Planar(Flow):
    """Planar flow `y = z + u_hat tanh(w.z + b)` (Rezende and Mohamed 2015).

    `u_hat = u + (m(w.u) - w.u) w / |w|^2` with `m(a) = -1 + softplus(a)`, so
    `w.u_hat > -1` and the map is invertible; `log|det J| = log(1 + w.u_hat tanh'(w.z + b))`.
    The inverse solves one scalar equation (see the module docstring).

    >>> flow = vi.Planar(2, key=jax.random.key(0))
    >>> z = jnp.array([0.3, -1.2])
    >>> y, _ = flow.forward(z)
    >>> bool(jnp.allclose(flow.inverse(y)[0], z, atol=1e-5))
    True
    """

    u: jax.Array
    w: jax.Array
    b: jax.Array
    dim: int = eqx.field(static=True)

    def __init__(self, dim: int, *, key, init_scale: float = 0.1):
        self.dim = _check_dim(dim, "vi.Planar")
        ku, kw = jax.random.split(_check_init_key(key, "vi.Planar"))
        self.u = init_scale * jax.random.normal(ku, (self.dim,))
        self.w = init_scale * jax.random.normal(kw, (self.dim,))
        self.b = jnp.zeros(())

    def _u_hat(self):
        wu = self.w @ self.u
        m = -1.0 + jax.nn.softplus(wu)
        return self.u + (m - wu) * self.w / (self.w @ self.w)

    def forward(self, z):
        u_hat = self._u_hat()
        a = self.w @ z + self.b
        h = jnp.tanh(a)
        return z + u_hat * h, jnp.log1p((self.w @ u_hat) * (1.0 - h**2))

    def inverse(self, y):
        u_hat = self._u_hat()
        c, t = self.w @ u_hat, self.w @ y  # solve g(a) = a + c tanh(a + b) - t = 0, a = w.z
        c0, t0, b0 = sg(c), sg(t), sg(self.b)

        def bisect(_, bracket):
            lo, hi = bracket
            mid = 0.5 * (lo + hi)
            above = mid + c0 * jnp.tanh(mid + b0) - t0 > 0
            return jnp.where(above, lo, mid), jnp.where(above, mid, hi)

        lo, hi = jax.lax.fori_loop(0, _BISECTIONS, bisect, (t0 - jnp.abs(c0), t0 + jnp.abs(c0)))
        a0 = 0.5 * (lo + hi)
        # The value is the root; the derivative in (y, parameters) is the implicit one,
        # -dg/dtheta / g'(a), carried by a zero-valued Newton correction (a Newton step's
        # value would divide float rounding by g', which is tiny where w.u_hat is near -1).
        slope = 1.0 + c0 * (1.0 - jnp.tanh(a0 + b0) ** 2)
        g = a0 + c * jnp.tanh(a0 + self.b) - t
        a = a0 - (g - sg(g)) / slope
        h = jnp.tanh(a + self.b)
        return y - u_hat * h, jnp.log1p(c * (1.0 - h**2))


class Radial(Flow):
    """Radial flow `y = z + beta (z - z0) / (alpha + r)`, `r = |z - z0|` (Rezende and
    Mohamed 2015).

    `alpha = softplus(raw_alpha) > 0` and `beta = -alpha + softplus(raw_beta) >= -alpha`
    (invertible). `log|det J| = (D - 1) log(1 + beta / (alpha + r)) + log(1 + alpha beta
    / (alpha + r)^2)`. The inverse is exact: `|y - z0| = r (1 + beta / (alpha + r))` is a
    quadratic in `r`. Starts as the identity (`beta = 0`) around a centre near 0.
    """

    z0: jax.Array
    raw_alpha: jax.Array
    raw_beta: jax.Array
    dim: int = eqx.field(static=True)

    def __init__(self, dim: int, *, key, init_scale: float = 0.1):
        self.dim = _check_dim(dim, "vi.Radial")
        self.z0 = init_scale * jax.random.normal(_check_init_key(key, "vi.Radial"), (self.dim,))
        self.raw_alpha = jnp.zeros(())
        self.raw_beta = jnp.zeros(())

    def _alpha_beta(self):
        alpha = jax.nn.softplus(self.raw_alpha)
        return alpha, -alpha + jax.nn.softplus(self.raw_beta)

    def _log_det(self, r, alpha, beta):
        return (self.dim - 1) * jnp.log1p(beta / (alpha + r)) + jnp.log1p(alpha * beta / (alpha + r) ** 2)

    def forward(self, z):
        alpha, beta = self._alpha_beta()
        r = _norm(z - self.z0)
        return z + beta / (alpha + r) * (z - self.z0), self._log_det(r, alpha, beta)

    def inverse(self, y):
        alpha, beta = self._alpha_beta()
        s = _norm(y - self.z0)
        # r^2 + B r - s alpha = 0, B = alpha + beta - s: the nonnegative root, in the
        # form that does not cancel for either sign of B
        big_b = alpha + beta - s
        root = jnp.sqrt(big_b**2 + 4.0 * s * alpha)
        safe = jnp.where(big_b >= 0, big_b + root, 1.0)
        r = jnp.where(big_b >= 0, 2.0 * s * alpha / safe, 0.5 * (root - big_b))
        z = self.z0 + (y - self.z0) / (1.0 + beta / (alpha + r))
        return z, self._log_det(r, alpha, beta)


class AffineCoupling(Flow):
    """Affine coupling (RealNVP, Dinh et al. 2017): coordinates `i` with `i % 2 ==
    parity` pass through; the others become `z * exp(s) + t`, with `(t, s)` an MLP
    (tanh hidden layers of sizes `hidden`) of the passing coordinates.

    Stack layers with alternating `parity` so every coordinate is transformed. With
    D = 1 and parity 0 the layer is the identity.
    """

    layers: tuple
    dim: int = eqx.field(static=True)
    parity: int = eqx.field(static=True)

    def __init__(self, dim: int, *, key, hidden: Sequence[int] = (32, 32), parity: int = 0):
        self.dim = _check_dim(dim, "vi.AffineCoupling")
        if parity not in (0, 1):
            raise ppl.ArgumentError(f"vi.AffineCoupling: parity must be 0 or 1, got {parity!r}.")
        self.parity = int(parity)
        sizes = (self.dim,) + _check_hidden(hidden, "vi.AffineCoupling") + (2 * self.dim,)
        keys = jax.random.split(_check_init_key(key, "vi.AffineCoupling"), len(sizes) - 1)
        layers = [eqx.nn.Linear(m, n, key=k) for m, n, k in zip(sizes[:-1], sizes[1:], keys)]
        last = layers[-1]
        layers[-1] = eqx.tree_at(lambda l: (l.weight, l.bias), last, (jnp.zeros_like(last.weight), jnp.zeros_like(last.bias)))
        self.layers = tuple(layers)

    def _shift_log_scale(self, x):
        keep = jnp.asarray(np.arange(self.dim) % 2 == self.parity, x.dtype)
        h = x * keep
        for layer in self.layers[:-1]:
            h = jnp.tanh(layer(h))
        out = self.layers[-1](h)
        move = 1.0 - keep
        return out[: self.dim] * move, _bounded(out[self.dim :]) * move

    def forward(self, z):
        t, s = self._shift_log_scale(z)
        return z * jnp.exp(s) + t, jnp.sum(s)

    def inverse(self, y):
        t, s = self._shift_log_scale(y)  # the passing coordinates are the same in y and z
        return (y - t) * jnp.exp(-s), jnp.sum(s)


class IAF(Flow):
    """Inverse autoregressive flow (Kingma et al. 2016): `y = mu(z) + exp(s(z)) * z`,
    with `mu_i` and `s_i` functions of the coordinates before `i` (in the order `0 ..
    D-1`, or `D-1 .. 0` with `reverse=True`), computed by a MADE network (Germain et al.
    2015: masked dense layers, tanh hidden layers of sizes `hidden`).

    `log|det J| = sum(s)`. Forward is one network pass; the inverse is D passes. Stack
    layers with alternating `reverse`. A hidden width below D - 1 is valid but leaves
    some dependencies out.
    """

    weights: tuple
    biases: tuple
    dim: int = eqx.field(static=True)
    hidden: tuple = eqx.field(static=True)
    reverse: bool = eqx.field(static=True)

    def __init__(self, dim: int, *, key, hidden: Sequence[int] = (32, 32), reverse: bool = False):
        self.dim = _check_dim(dim, "vi.IAF")
        self.hidden = _check_hidden(hidden, "vi.IAF")
        self.reverse = bool(reverse)
        sizes = (self.dim,) + self.hidden + (2 * self.dim,)
        keys = jax.random.split(_check_init_key(key, "vi.IAF"), len(sizes) - 1)
        weights, biases = [], []
        for m, n, k in zip(sizes[:-1], sizes[1:], keys):
            # equinox's Linear initialization; random biases matter: with zero biases
            # a tanh network of z_<i is odd and slow to learn even dependencies
            bound = 1.0 / math.sqrt(m)
            kw, kb = jax.random.split(k)
            weights.append(jax.random.uniform(kw, (n, m), minval=-bound, maxval=bound))
            biases.append(jax.random.uniform(kb, (n,), minval=-bound, maxval=bound))
        weights[-1] = jnp.zeros_like(weights[-1])  # start as the identity
        biases[-1] = jnp.zeros_like(biases[-1])
        self.weights, self.biases = tuple(weights), tuple(biases)

    def _shift_log_scale(self, z):
        h = z
        masks = _made_masks(self.dim, self.hidden, self.reverse)
        for i, (w, b, m) in enumerate(zip(self.weights, self.biases, masks)):
            h = (w * m) @ h + b
            if i < len(masks) - 1:
                h = jnp.tanh(h)
        return h[: self.dim], _bounded(h[self.dim :])

    def forward(self, z):
        mu, s = self._shift_log_scale(z)
        return mu + jnp.exp(s) * z, jnp.sum(s)

    def inverse(self, y):
        def step(carry, _):
            z, _s = carry
            mu, s = self._shift_log_scale(z)
            return ((y - mu) * jnp.exp(-s), s), None

        # pass k makes the k first coordinates (in the layer's order) exact; the last
        # pass's s depends only on coordinates exact before it
        (z, s), _ = jax.lax.scan(step, (jnp.zeros_like(y), jnp.zeros_like(y)), None, length=self.dim)
        return z, jnp.sum(s)


@functools.lru_cache(maxsize=None)
def _made_masks(dim: int, hidden: tuple, reverse: bool) -> tuple:
    """MADE connectivity (numpy constants): output i sees inputs of lower degree only."""
    degree_in = np.arange(dim, 0, -1) if reverse else np.arange(1, dim + 1)
    degrees = [degree_in] + [np.arange(h) % max(dim - 1, 1) + 1 for h in hidden]
    masks = [(d_out[:, None] >= d_in[None, :]).astype(np.float32) for d_in, d_out in zip(degrees[:-1], degrees[1:])]
    d_out = np.concatenate([degree_in, degree_in])  # shift and log-scale heads
    masks.append((d_out[:, None] > degrees[-1][None, :]).astype(np.float32))
    return tuple(masks)


def _bounded(raw):
    return _LOG_SCALE_LIMIT * jnp.tanh(raw / _LOG_SCALE_LIMIT)


def _norm(v):
    return jnp.sqrt(jnp.sum(v**2) + 1e-30)  # finite gradient at the centre


# ----------------------------------------------------------------------------------------
# The flow distribution
# ----------------------------------------------------------------------------------------


def _check_flows(flows, where) -> tuple:
    if isinstance(flows, Flow):
        flows = (flows,)
    if not isinstance(flows, (tuple, list)) or not flows:
        raise ppl.ArgumentError(
            f"{where}: expected a non-empty sequence of flows (vi.Planar, vi.Radial, vi.AffineCoupling, "
            f"vi.IAF, vi.DiagonalAffine), got {type(flows).__name__}."
        )
    for i, f in enumerate(flows):
        if not isinstance(f, Flow):
            raise ppl.ArgumentError(f"{where}: layer {i} is a {type(f).__name__}, not a vi.Flow.")
    dims = [f.dim for f in flows]
    if len(set(dims)) > 1:
        raise ppl.ArgumentError(
            f"{where}: the layers act on different dimensions {dims}; every layer of a stack maps R^D to R^D."
        )
    return tuple(flows)


def _push(flows, z):
    total = jnp.zeros(())
    for f in flows:
        z, log_det = f.forward(z)
        total = total + log_det
    return z, total


def _pull(flows, y):
    total = jnp.zeros(())
    for f in reversed(flows):
        y, log_det = f.inverse(y)
        total = total + log_det
    return y, total


def _std_normal_logpdf(z):
    return -0.5 * jnp.sum(z**2, -1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)


class FlowDistribution(dist.Distribution):
    """N(0, I_D) pushed through `flows` (applied in order): a distribution over R^D.

    `sample` is reparameterized (the forward pass); `log_prob(x)` inverts the layers
    (exactly, or for `Planar` by a root find accurate to float rounding) and applies the
    change of variables; `sample_and_log_prob(key)` gives a draw and its log density
    from the forward pass alone.

    >>> flows = (vi.DiagonalAffine(2), vi.Radial(2, key=jax.random.key(0)))
    >>> q = vi.FlowDistribution(flows)
    >>> x, log_q = q.sample_and_log_prob(jax.random.key(1), (3,))
    >>> x.shape, bool(jnp.allclose(q.log_prob(x), log_q, atol=1e-5))
    ((3, 2), True)
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    pytree_data_fields = ("flows",)

    def __init__(self, flows, *, validate_args=None):
        self.flows = _check_flows(flows, "vi.FlowDistribution")
        super().__init__(batch_shape=(), event_shape=(self.flows[0].dim,), validate_args=validate_args)

    @property
    def has_rsample(self):
        return True

    def rsample(self, key, sample_shape=()):
        return self.sample(key, sample_shape)

    def sample(self, key, sample_shape=()):
        return self.sample_and_log_prob(key, sample_shape)[0]

    def sample_and_log_prob(self, key, sample_shape=()):
        """`(x, log q(x))` for draws of shape `sample_shape + (D,)`, without an inverse."""
        dim = self.event_shape[0]
        eps = jax.random.normal(key, tuple(sample_shape) + (dim,))
        x, log_det = jax.vmap(lambda e: _push(self.flows, e))(eps.reshape(-1, dim))
        log_q = _std_normal_logpdf(eps.reshape(-1, dim)) - log_det
        return x.reshape(eps.shape), log_q.reshape(eps.shape[:-1])

    def log_prob(self, value):
        value = jnp.asarray(value)
        dim = self.event_shape[0]
        z, log_det = jax.vmap(lambda y: _pull(self.flows, y))(value.reshape(-1, dim))
        return (_std_normal_logpdf(z) - log_det).reshape(value.shape[:-1])


# ----------------------------------------------------------------------------------------
# The flow guide
# ----------------------------------------------------------------------------------------


def flow_guide(model, model_args: tuple = (), observations=None, flows="iaf", *, key=None,
               num_flows: int = 4, hidden: Sequence[int] = (32, 32), init_scale: float = 1.0):
    """A normalizing-flow guide over all the model's latent choices: `(guide, params)`.

    The flow acts on the D unconstrained coordinates of the latent choices (in the
    order of `model`'s trace, each site's coordinates flattened), then each site's piece
    is mapped into its support with `biject_to`. `params` is the tuple of flow layers
    (equinox modules; optimize it with `vi.fit`). `flows` is

    - a name: `"iaf"`, `"coupling"`, `"planar"` or `"radial"`: `DiagonalAffine(D,
      init_scale)` (the Gaussian base) followed by `num_flows` layers of that kind
      (IAF layers alternate `reverse`, coupling layers `parity`; networks have hidden
      sizes `hidden`), initialized from `key`. The base starts at scale 1 (auto_normal
      starts at 0.1): the layers learn dependencies only where the draws spread, and
      started narrow they stay near a Gaussian for long;
    - a sequence of `vi.Flow` layers of dimension D;
    - a function `(key, D) -> sequence of layers`.

    The guide (called with `(params, *model_args)`) draws all sites jointly, and its
    trace score is the joint `log q(x)` on the sites' own spaces. `generate`, `update`,
    `regenerate` and `project` take any subset of the sites; where some sites are given
    or selected and the others must be drawn, they are drawn from a fixed proposal
    (standard normals on their unconstrained coordinates) and the weights are exact for
    it (see the module docstring).

    >>> import numpyro.distributions as dist
    >>> @ppl.gen
    ... def model():
    ...     a = ppl.sample("a", dist.Normal(0.0, 1.0))
    ...     ppl.sample("b", dist.LogNormal(a, 0.5))
    >>> guide, params = vi.flow_guide(model, (), None, "coupling", key=jax.random.key(0))
    >>> tr = guide.simulate(jax.random.key(1), (params,))
    >>> sorted(tr.choices.addresses()), bool(tr["b"] > 0)
    ([('a',), ('b',)], True)
    """
    sites = _latents(model, model_args, observations, "vi.flow_guide")
    sizes = [math.prod(transform.inverse_shape(shape)) for _, shape, _, transform in sites]
    dim = sum(sizes)
    params = _build(flows, dim, key, num_flows, hidden, init_scale)
    return _FlowGuide(sites, sizes, f"flow_guide({model.__name__})"), params


_KINDS: dict[str, Callable] = {
    "iaf": lambda d, k, i, hidden: IAF(d, key=k, hidden=hidden, reverse=bool(i % 2)),
    "coupling": lambda d, k, i, hidden: AffineCoupling(d, key=k, hidden=hidden, parity=i % 2),
    "planar": lambda d, k, i, hidden: Planar(d, key=k),
    "radial": lambda d, k, i, hidden: Radial(d, key=k),
}


def _build(flows, dim, key, num_flows, hidden, init_scale) -> tuple:
    where = "vi.flow_guide"
    if isinstance(flows, str):
        if flows not in _KINDS:
            raise ppl.ArgumentError(
                f"{where}: unknown flow {flows!r}; choose one of {', '.join(map(repr, _KINDS))}, or pass "
                "a sequence of vi.Flow layers."
            )
        if isinstance(num_flows, bool) or not isinstance(num_flows, (int, np.integer)) or num_flows < 1:
            raise ppl.ArgumentError(f"{where}: num_flows must be a positive int, got {num_flows!r}.")
        keys = jax.random.split(_check_init_key(key, where), int(num_flows))
        hidden = _check_hidden(hidden, where)
        return (DiagonalAffine(dim, init_scale),) + tuple(_KINDS[flows](dim, k, i, hidden) for i, k in enumerate(keys))
    if callable(flows) and not isinstance(flows, Flow):
        flows = flows(_check_init_key(key, where), dim)
    layers = _check_flows(flows, where)
    if layers[0].dim != dim:
        raise ppl.ArgumentError(
            f"{where}: the flow layers have dimension {layers[0].dim}, but the model's latent choices "
            f"have {dim} unconstrained coordinates; build the layers with dim={dim}."
        )
    return layers


class _FlowGuide(ppl.GenerativeFunction):
    """The joint flow guide: a generative function with one choice per model site."""

    def __init__(self, sites, sizes, name):
        self.sites = sites
        self.paths = [path for path, *_ in sites]
        self.sizes = sizes
        self.dim = sum(sizes)
        self.__name__ = name

    def _check_arity(self, args, method):
        if len(args) < 1:
            raise ppl.ArgumentError(f"{self.__name__} is called with (params, *model_args); got no arguments.")

    def _distribution(self, params) -> FlowDistribution:
        layers = _check_flows(params, self.__name__)
        if layers[0].dim != self.dim:
            raise ppl.ArgumentError(
                f"{self.__name__}: the params are flow layers of dimension {layers[0].dim}, but the "
                f"guide's sites have {self.dim} unconstrained coordinates."
            )
        return FlowDistribution(layers)

    def _constrain(self, u):
        """Per-site values from the unconstrained vector, and the log-Jacobian of the maps."""
        values, log_det, start = [], jnp.zeros(()), 0
        for (_, shape, dtype, transform), k in zip(self.sites, self.sizes):
            piece = u[start : start + k].reshape(tuple(transform.inverse_shape(shape)))
            x = transform(piece)
            log_det = log_det + jnp.sum(transform.log_abs_det_jacobian(piece, x))
            values.append(x.astype(dtype))
            start += k
        return tuple(values), log_det

    def _unconstrained(self, values):
        """Per site: the flat unconstrained piece `t^-1(x)`, `log|det dt/du|` there, and
        whether `x` lies in the site's support."""
        pieces, log_dets, inside = [], [], []
        for (_, _, _, transform), x in zip(self.sites, values):
            piece = transform.inv(x)
            log_dets.append(jnp.sum(transform.log_abs_det_jacobian(piece, x)))
            inside.append(jnp.all(transform.codomain(x)))
            pieces.append(jnp.reshape(piece, (-1,)))
        return pieces, log_dets, inside

    def _score(self, args, values):
        """log q(values): -inf outside the sites' supports."""
        pieces, log_dets, inside = self._unconstrained(values)
        lp = self._distribution(args[0]).log_prob(jnp.concatenate(pieces)) - sum(log_dets)
        return jnp.where(jnp.all(jnp.stack(inside)), lp, -jnp.inf)

    def _proposal_log_density(self, values, which):
        """log r of the sites marked in `which` at `values` (the fixed proposal, see
        `_propose`): -inf outside their supports."""
        pieces, log_dets, inside = self._unconstrained(values)
        lp, ok = jnp.zeros(()), jnp.asarray(True)
        for piece, log_det, is_in, chosen in zip(pieces, log_dets, inside, which):
            if chosen:
                lp = lp + _std_normal_logpdf(piece) - log_det
                ok = ok & is_in
        return jnp.where(ok, lp, -jnp.inf)

    def _propose(self, key, which):
        """Draw the sites marked in `which` from the fixed proposal r: independent
        standard normals on their unconstrained coordinates, pushed through `biject_to`.
        Returns `(values, log r(values))`, `values[i]` None for unmarked sites."""
        if isinstance(key, ppl.ParticleKey):
            key = jax.random.fold_in(key.key, key.index)
        eps = jax.random.normal(key, (self.dim,))
        values, lp, start = [], jnp.zeros(()), 0
        for (_, shape, dtype, transform), k, chosen in zip(self.sites, self.sizes, which):
            if chosen:
                piece = eps[start : start + k]
                u = piece.reshape(tuple(transform.inverse_shape(shape)))
                x = transform(u)
                lp = lp + _std_normal_logpdf(piece) - jnp.sum(transform.log_abs_det_jacobian(u, x))
                values.append(x.astype(dtype))
            else:
                values.append(None)
            start += k
        return values, lp

    def _given(self, choices, method):
        """Per site, its value in `choices` or None when `choices` does not name it."""
        named = choices.addresses()
        unknown = [a for a in named if a not in self.paths]
        if unknown:
            raise ppl.UnknownAddressError(
                f"{self.__name__}.{method}: {format_address(unknown[0])} names no site of the guide. "
                f"Its sites: {', '.join(format_address(p) for p in self.paths)}."
                + suggest(unknown[0], self.paths)
            )
        values = []
        for path, shape, dtype, _ in self.sites:
            if path not in named:
                values.append(None)
                continue
            v = jnp.asarray(choices[path])
            if v.shape != shape:
                raise ppl.ArgumentError(
                    f"{self.__name__}.{method}: the value at {format_address(path)} has shape {v.shape}; "
                    f"the site has shape {shape}."
                )
            values.append(v.astype(dtype))
        return tuple(values)

    def _trace(self, args, values, score):
        return ppl.Trace(self, args, None, score, tuple(values))

    def _simulate(self, key, args):
        if isinstance(key, ppl.ParticleKey):
            key = jax.random.fold_in(key.key, key.index)
        u, log_q = self._distribution(args[0]).sample_and_log_prob(key)
        values, log_det = self._constrain(u)
        return self._trace(args, values, log_q - log_det)

    def _assess(self, choices, args):
        values = self._given(choices, "assess")
        missing = [p for p, v in zip(self.paths, values) if v is None]
        if missing:
            raise ppl.UnknownAddressError(
                f"{self.__name__}.assess: no value for {', '.join(format_address(p) for p in missing)}; "
                f"assess needs every site ({', '.join(format_address(p) for p in self.paths)})."
            )
        return self._score(args, values), None

    def _generate(self, key, constraints, args):
        given = self._given(constraints, "generate")
        free = [v is None for v in given]
        if all(free):  # the proposal is the flow itself: weight q / q = 1
            return self._simulate(key, args), jnp.zeros(())
        drawn, log_r = self._propose(key, free)
        values = [d if g is None else g for g, d in zip(given, drawn)]
        score = self._score(args, values)
        return self._trace(args, values, score), score - log_r

    def _update(self, key, trace, constraints, args):
        given = self._given(constraints, "update")
        values = [old if g is None else g for old, g in zip(trace.inner, given)]
        discard = ppl.ChoiceMap({p: old for p, old, g in zip(self.paths, trace.inner, given) if g is not None})
        score = self._score(args, values)
        return self._trace(args, values, score), score - trace.score, discard

    def _regenerate(self, key, trace, selection, args):
        chosen = [p in selection for p in self.paths]
        if all(chosen):  # proposed from the flow itself: the MH ratio is 1
            return self._simulate(key, args), jnp.zeros(())
        drawn, log_r_new = self._propose(key, chosen)
        values = [old if d is None else d for old, d in zip(trace.inner, drawn)]
        log_r_old = self._proposal_log_density(trace.inner, chosen)
        score = self._score(args, values)
        return self._trace(args, values, score), score - trace.score - log_r_new + log_r_old

    def _project(self, trace, selection):
        chosen = [p in selection for p in self.paths]
        if all(chosen):
            return trace.score
        if not any(chosen):
            return jnp.zeros(())
        return trace.score - self._proposal_log_density(trace.inner, [not c for c in chosen])

    def _choices(self, trace):
        return ppl.ChoiceMap(dict(zip(self.paths, trace.inner)))


# ----------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------


def _check_dim(dim, where) -> int:
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ppl.ArgumentError(f"{where}: dim must be a positive int, got {dim!r}.")
    return int(dim)


def _check_hidden(hidden, where) -> tuple:
    if isinstance(hidden, (int, np.integer)):
        hidden = (hidden,)
    hidden = tuple(hidden)
    if any(isinstance(h, bool) or not isinstance(h, (int, np.integer)) or h < 1 for h in hidden):
        raise ppl.ArgumentError(f"{where}: hidden must be a sequence of positive ints, got {hidden!r}.")
    return tuple(int(h) for h in hidden)


def _check_init_key(key, where):
    if key is None:
        raise ppl.ArgumentError(
            f"{where}: the layers' initial weights are random; pass key=jax.random.key(0) (any key)."
        )
    return key


def _softplus_inverse(x, where) -> float:
    if not isinstance(x, (int, float)) or isinstance(x, bool) or not x > 0:
        raise ppl.ArgumentError(f"{where}: init_scale must be a positive number, got {x!r}.")
    return math.log(math.expm1(x))
