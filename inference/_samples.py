"""`Samples`: the draws of an MCMC run, with diagnostics (numpyro.diagnostics) and export.

`samples[address]` is an array `[num_chains, num_draws, ...]` for every latent random
choice and every deterministic site (`ppl.deterministic`) of the model; `summary()`
gives mean, sd, quantiles, bulk ESS and split r_hat per site and element.
"""

from __future__ import annotations

import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin

import ppl
from ppl.extend import format_address, suggest

__all__ = ["Samples", "ConvergenceWarning", "user_key"]

R_HAT_THRESHOLD = 1.01


class ConvergenceWarning(UserWarning):
    """An MCMC run whose diagnostics say its draws may not represent the posterior
    (split r_hat above 1.01, or divergent transitions)."""


def user_key(path: tuple):
    """How results name an address: `'mu'` for a top-level site, `('sub', 'z')` below."""
    return path[0] if len(path) == 1 else path


def _path(address) -> tuple:
    if isinstance(address, str):
        return (address,)
    if isinstance(address, tuple) and all(isinstance(a, str) for a in address):
        return address
    raise ppl.AddressError(f"Samples: {address!r} is not an address; write 'mu' or ('sub', 'z').")


@jax.tree_util.register_pytree_node_class
class Samples:
    """Draws of an MCMC run.

    - `samples[address]`: array `[num_chains, num_draws, ...]` (address a string or a
      tuple path), for latent choices and deterministic sites.
    - `info`: the kernel's per-step diagnostics, leaves `[num_chains, num_draws]`.
    - `divergences`: `[num_chains]` count of divergent transitions among the draws.
    - `summary(prob=0.9)`, `thin(k)`, `flatten()`, `to_dict()`, `to_arviz()`.

    A registered pytree (its leaves are the draws and the info), so it passes through
    `jax.jit` and `jax.tree.map`.
    """

    def __init__(self, draws: dict, info, deterministic: tuple = ()):
        deterministic = tuple(tuple(p) for p in deterministic)
        ordered = sorted(draws, key=lambda p: (tuple(p) in deterministic, tuple(p)))  # latent choices first
        self._draws = {tuple(p): draws[p] for p in ordered}
        self.info = info
        self.deterministic = deterministic

    # -- access -----------------------------------------------------------------------
    @property
    def addresses(self) -> list[tuple]:
        """Tuple paths of every recorded site, latent choices first."""
        return list(self._draws)

    @property
    def latent(self) -> list[tuple]:
        """Tuple paths of the latent random choices."""
        return [p for p in self._draws if p not in self.deterministic]

    def keys(self) -> list:
        """Site names as users write them: 'mu', or ('sub', 'z') for a nested site."""
        return [user_key(p) for p in self._draws]

    def __getitem__(self, address) -> jax.Array:
        path = _path(address)
        if path not in self._draws:
            raise ppl.UnknownAddressError(
                f"Samples: no draws at {format_address(path)}. Recorded sites: "
                f"{', '.join(map(format_address, self._draws)) or '(none)'}." + suggest(path, list(self._draws))
            )
        return self._draws[path]

    def __contains__(self, address) -> bool:
        try:
            return _path(address) in self._draws
        except ppl.AddressError:
            return False

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._draws)

    @property
    def num_chains(self) -> int:
        return int(np.shape(next(iter(self._draws.values())))[0]) if self._draws else 0

    @property
    def num_draws(self) -> int:
        return int(np.shape(next(iter(self._draws.values())))[1]) if self._draws else 0

    @property
    def divergences(self) -> jax.Array:
        """`[num_chains]` number of divergent transitions among the draws."""
        # summed on the host: an eager jnp.sum compiles a program
        counts = np.sum(is_divergent(self.info), axis=1, dtype=np.int32) if self._draws else np.zeros(0, np.int32)
        return jax.device_put(counts)

    def to_dict(self) -> dict:
        """`{name: [num_chains, num_draws, ...]}` with names as in `keys()`."""
        return {user_key(p): v for p, v in self._draws.items()}

    def flatten(self) -> dict:
        """`{name: [num_chains * num_draws, ...]}`: the chains' draws concatenated."""
        return {user_key(p): jnp.reshape(v, (-1,) + jnp.shape(v)[2:]) for p, v in self._draws.items()}

    def thin(self, k: int) -> Samples:
        """Every `k`-th draw of each chain (draws `0, k, 2k, ...`)."""
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ppl.ArgumentError(f"Samples.thin: k must be a positive int, got {k!r}.")
        take = lambda x: x[:, ::k]  # noqa: E731
        return Samples({p: take(v) for p, v in self._draws.items()}, jax.tree.map(take, self.info), self.deterministic)

    # -- diagnostics --------------------------------------------------------------------
    def summary(self, prob: float = 0.9) -> Summary:
        """Per site and element: mean, sd, median, the (1-prob)/2 and (1+prob)/2
        quantiles, bulk effective sample size `n_eff` and split `r_hat`
        (numpyro.diagnostics). Returns a `Summary` (a dict `{name: {stat: array}}`)
        whose `str` is the table; `print(samples.summary())` shows it."""
        lo, hi = 50 * (1 - prob), 50 * (1 + prob)
        table = Summary()
        for path, value in self._draws.items():
            x = np.asarray(value, dtype=np.float64)
            if x.dtype == bool:
                x = x.astype(np.float64)
            flat = x.reshape((-1,) + x.shape[2:])
            table[user_key(path)] = {
                "mean": flat.mean(axis=0),
                "sd": flat.std(axis=0, ddof=1) if flat.shape[0] > 1 else np.full(flat.shape[1:], np.nan),
                "median": np.median(flat, axis=0),
                f"{lo:g}%": np.quantile(flat, lo / 100, axis=0),
                f"{hi:g}%": np.quantile(flat, hi / 100, axis=0),
                "n_eff": _diagnostic(effective_sample_size, x),
                "r_hat": _diagnostic(split_gelman_rubin, x),
            }
        return table

    def _warn_if_suspect(self, stacklevel: int = 3) -> None:
        """Warn (ConvergenceWarning) about divergences and sites with r_hat > 1.01."""
        divergences = np.asarray(self.divergences)
        if divergences.sum() > 0:
            warnings.warn(
                f"{int(divergences.sum())} divergent transition(s) after warmup (per chain: "
                f"{divergences.tolist()}). The draws may be biased: raise target_accept_prob (e.g. 0.95), "
                "or reparameterize the model (non-centered scales).",
                ConvergenceWarning, stacklevel=stacklevel,
            )
        if self.num_chains < 2 or self.num_draws < 4:
            return
        bad = []
        for path in self.latent:
            with np.errstate(invalid="ignore", divide="ignore"):
                r_hat = _diagnostic(split_gelman_rubin, np.asarray(self._draws[path], dtype=np.float64))
            worst = np.nanmax(r_hat) if np.size(r_hat) and not np.all(np.isnan(r_hat)) else np.nan
            if worst > R_HAT_THRESHOLD:
                bad.append(f"{format_address(path)} (r_hat {worst:.3f})")
        if bad:
            warnings.warn(
                f"split r_hat above {R_HAT_THRESHOLD} at {', '.join(bad)}: the chains disagree. Run longer "
                "(more warmup and draws), or check the model for multimodality or weak identification.",
                ConvergenceWarning, stacklevel=stacklevel,
            )

    # -- export -------------------------------------------------------------------------
    def to_arviz(self):
        """An `arviz.InferenceData` with the draws as `posterior` (deterministic sites
        included) and the kernel's diagnostics as `sample_stats` (`diverging`, ...).
        Needs ArviZ (`pip install arviz`)."""
        try:
            import arviz
        except ImportError:
            raise ImportError(
                "Samples.to_arviz needs ArviZ, which is not installed. Install it with "
                "`pip install arviz` (or the project's `notebooks` extra)."
            ) from None
        posterior = {"/".join(p): np.asarray(v) for p, v in self._draws.items()}
        stats = {"diverging": np.asarray(is_divergent(self.info))}
        for name, value in _named_stats(self.info).items():
            stats.setdefault(name, np.asarray(value))
        return arviz.from_dict(posterior=posterior, sample_stats=stats)

    def __repr__(self) -> str:
        sites = ", ".join(
            f"{format_address(p)}{list(np.shape(v)[2:]) if np.ndim(v) > 2 else ''}" for p, v in self._draws.items()
        )
        return (
            f"Samples(num_chains={self.num_chains}, num_draws={self.num_draws}, sites: {sites}; "
            f"divergences={np.asarray(self.divergences).tolist()})"
        )

    def tree_flatten(self):
        paths = tuple(self._draws)
        return (tuple(self._draws[p] for p in paths), self.info), (paths, self.deterministic)

    @classmethod
    def tree_unflatten(cls, aux, children):
        paths, deterministic = aux
        values, info = children
        return cls(dict(zip(paths, values)), info, deterministic)


class Summary(dict):
    """`{name: {stat: array}}` from `Samples.summary`; its `str` is a table with one
    row per site element."""

    def __str__(self) -> str:
        if not self:
            return "(no sites)"
        columns = list(next(iter(self.values())))
        rows = []
        for name, stats in self.items():
            base = name if isinstance(name, str) else "/".join(name)
            shape = np.shape(stats["mean"])
            for idx in itertools.product(*map(range, shape)):
                label = base + (f"[{','.join(map(str, idx))}]" if idx else "")
                rows.append([label] + [_fmt(np.asarray(stats[c])[idx], c) for c in columns])
        width = max(10, max(len(r[0]) for r in rows))
        lines = [" " * width + "".join(f"{c:>10}" for c in columns)]
        lines += [f"{r[0]:>{width}}" + "".join(f"{v:>10}" for v in r[1:]) for r in rows]
        return "\n".join(lines)

    __repr__ = __str__


def _fmt(value, column: str) -> str:
    value = float(value)
    if column == "n_eff":
        return "nan" if np.isnan(value) else f"{value:.1f}"
    return f"{value:.3f}" if abs(value) < 1e4 or not np.isfinite(value) else f"{value:.3e}"


def _diagnostic(fn, x: np.ndarray) -> np.ndarray:
    """numpyro's diagnostic over `[chains, draws, ...]`; NaN where it is undefined
    (a single draw, or a single chain for r_hat)."""
    if x.shape[1] < 4:
        return np.full(x.shape[2:], np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(fn(x))


def is_divergent(info) -> np.ndarray:
    """Whether each step of a kernel's info pytree diverged (any HMC part of a cycle), on
    the host."""
    from ._hmc import HMCInfo

    flags = [np.asarray(leaf.is_divergent)
             for leaf in jax.tree.leaves(info, is_leaf=lambda x: isinstance(x, HMCInfo)) if isinstance(leaf, HMCInfo)]
    if not flags:
        leaves = jax.tree.leaves(info)
        shape = np.shape(leaves[0]) if leaves else (0, 0)
        return np.zeros(shape, bool)
    out = flags[0]
    for f in flags[1:]:
        out = out | f
    return out


def _named_stats(info) -> dict:
    """Flat `{field: array}` of a kernel info (NamedTuples, nested in tuples for cycle)."""
    out = {}

    def walk(node, prefix):
        if hasattr(node, "_fields"):
            for field in node._fields:
                walk(getattr(node, field), prefix + (field,))
        elif isinstance(node, (tuple, list)):
            for i, child in enumerate(node):
                walk(child, prefix + (str(i),))
        elif node is not None:
            out["_".join(prefix)] = node

    walk(info, ())
    return out
