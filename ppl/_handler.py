"""The interpreter behind the DSL: site records and the per-call handler.

Each GFI method of a `@gen` function runs its body once, while tracing, under a
`_Handler` that gives `sample`/`factor`/`reward` the meaning of that method: draw or
read a value, accumulate the score and the importance weight, record the site. The
handler lives only for that one run (no state survives it), and every site draws from
its own key `fold_in(key, hash(address))`, so the same key gives the same trace bit for
bit and adding a site does not change the draws of the others.

A DSL trace's `inner` is a dict address -> record: `Site(value, score)` for a random
choice, `Observed(value, score)` for an `obs=` site, `Factor(log_weight)` and
`Reward(reward, log_weight)` for soft evidence, a `Trace` for a nested call.
"""

from __future__ import annotations

import os
import sys
import threading
import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ._choicemap import ChoiceMap
from ._distribution import log_density, prepare_value
from ._errors import (
    AddressError,
    ArgumentError,
    DuplicateAddressError,
    UnknownAddressError,
    format_address,
    suggest,
)
from ._gfi import GenerativeFunction
from ._selection import Selection
from ._trace import Trace

__all__ = ["Site", "Observed", "Factor", "Reward", "Handler", "current_handler", "run_handler", "sum_terms", "record_score"]


class Site(NamedTuple):
    """A random choice: its value and its log density (summed to a scalar)."""

    value: Any
    score: jax.Array


class Observed(NamedTuple):
    """An `obs=` site: always constrained to `value`; `score` is its log likelihood."""

    value: Any
    score: jax.Array


class Factor(NamedTuple):
    """Soft evidence added to the score; records no choice."""

    log_weight: jax.Array


class Reward(NamedTuple):
    """A reward factor: the reward value and the log weight `beta * link(reward)`."""

    reward: jax.Array
    log_weight: jax.Array


_FACTORS = (Factor, Reward)
_PPL_DIR = os.path.dirname(os.path.abspath(__file__))
_state = threading.local()


def _stack() -> list:
    if not hasattr(_state, "handlers"):
        _state.handlers = []
        _state.path = []
    return _state.handlers


def current_handler(what: str) -> Handler:
    stack = _stack()
    if not stack:
        raise ArgumentError(
            f"{what} was called outside a generative function. Decorate the model with "
            "@ppl.gen and run it through a GFI method, e.g. model.simulate(key, args)."
        )
    return stack[-1]


def _address_key(key, address: str):
    return jax.random.fold_in(key, zlib.crc32(address.encode()) & 0x7FFFFFFF)


def _user_location() -> str:
    """file:line of the innermost frame outside this package (the model's line)."""
    frame = sys._getframe(1)
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == _PPL_DIR:
        frame = frame.f_back
    if frame is None:
        return "<unknown>"
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"


def record_score(rec) -> jax.Array:
    """The record's contribution to the score."""
    return rec.log_weight if isinstance(rec, _FACTORS) else rec.score


class Handler:
    """What `sample`/`factor`/`reward` mean during one GFI call of one DSL function."""

    def __init__(self, gen_fn, method: str, key=None, constraints=None, old=None, selection=None):
        self.gen_fn = gen_fn
        self.method = method
        self.key = key
        self.constraints = constraints if constraints is not None else ChoiceMap()
        self.old = old if old is not None else {}
        self.selection = selection if selection is not None else Selection.none()
        self.records: dict[str, Any] = {}
        self.locations: dict[str, str] = {}
        self.weights: list = []
        self.discard: dict[str, Any] = {}
        self.path = tuple(_state.path) if hasattr(_state, "path") else ()

    # -- bookkeeping ---------------------------------------------------------------------
    def where(self, address) -> str:
        return format_address(self.path + (address,))

    def claim(self, address, what: str) -> None:
        if not isinstance(address, str) or not address:
            raise AddressError(
                f"{what}: address {address!r} must be a non-empty string, e.g. "
                f"{what}('x', ...); nested calls are addressed by the string of the call."
            )
        here = _user_location()
        if address in self.records:
            raise DuplicateAddressError(
                f"{self.gen_fn.__name__}: address {self.where(address)} is used twice, at "
                f"{self.locations[address]} and at {here}. Every sample, factor and reward in "
                "one execution needs its own address; inside a Python loop write "
                "f'x_{i}', or use ppl.vmap / ppl.scan for repeated structure."
            )
        self.locations[address] = here

    def key_for(self, address):
        return _address_key(self.key, address)

    def constraint(self, address):
        """The constraint for a distribution site, or None."""
        if address not in self.constraints:
            return None
        sub = self.constraints.get_submap(address)
        if not sub.has_value:
            raise AddressError(
                f"{self.gen_fn.__name__}: constraint at {self.where(address)} is a nested map, but "
                "the site is a distribution; give its value directly."
            )
        return sub[()]

    # -- sites ---------------------------------------------------------------------------
    def sample_distribution(self, address, d, obs):
        method, old = self.method, self.old.get(address)
        if obs is not None:
            if method in ("generate", "update") and address in self.constraints:
                raise AddressError(
                    f"{self.gen_fn.__name__}: site {self.where(address)} is observed with obs= "
                    "inside the model, so it cannot also be constrained. Drop it from the "
                    "constraints, or remove obs= and pass the data as a constraint."
                )
            value = prepare_value(self.path + (address,), d, obs, "observation")
            lp = log_density(d, value, check_support=True)
            if method == "generate":
                self.weights.append(lp)
            elif method in ("update", "regenerate"):
                self.weights.append(lp - old.score if isinstance(old, Observed) else lp)
            self.records[address] = Observed(value, lp)
            return value

        if method == "assess":
            if address not in self.constraints:
                raise UnknownAddressError(
                    f"{self.gen_fn.__name__}.assess: no value for random choice "
                    f"{self.where(address)}; assess needs every choice of the model."
                    + suggest(address, list(self.constraints))
                )
            value = prepare_value(self.path + (address,), d, self.constraint(address), "choice")
            lp = log_density(d, value, check_support=True)
        elif method in ("generate", "update") and address in self.constraints:
            value = prepare_value(
                self.path + (address,), d, self.constraint(address), "constraint"
            )
            lp = log_density(d, value, check_support=True)
            if isinstance(old, Site):
                self.discard[address] = old.value
                self.weights.append(lp - old.score)
            else:
                self.weights.append(lp)
        elif (
            method in ("update", "regenerate")
            and isinstance(old, Site)
            and not (method == "regenerate" and address in self.selection)
        ):
            # Kept value: its distribution may have moved (support included).
            value = old.value
            lp = log_density(d, value, check_support=True)
            self.weights.append(lp - old.score)
        else:
            value = d.sample(self.key_for(address))
            lp = log_density(d, value, check_support=False)
        self.records[address] = Site(value, lp)
        return value

    def call(self, address, gen_fn: GenerativeFunction, args: tuple):
        method, old = self.method, self.old.get(address)
        _state.path.append(address)
        try:
            if method == "simulate":
                tr = gen_fn.simulate(self.key_for(address), args)
            elif method == "assess":
                lp, retval = gen_fn.assess(self.constraints.get_submap(address), args)
                self.records[address] = Factor(lp)  # assess keeps only the density
                return retval
            elif method == "generate" or not isinstance(old, Trace):
                sub = self.constraints.get_submap(address) if method != "regenerate" else ChoiceMap()
                tr, w = gen_fn.generate(self.key_for(address), sub, args)
                if method == "regenerate":  # fresh from the prior: only its factors weigh
                    w = gen_fn.project(tr, Selection.none())
                self.weights.append(w)
            elif method == "update":
                tr, w, discard = gen_fn.update(
                    self.key_for(address), old, self.constraints.get_submap(address), args
                )
                self.weights.append(w)
                if not discard.is_empty:
                    self.discard[address] = discard
            else:  # regenerate
                if old.gen_fn != gen_fn:
                    raise ArgumentError(
                        f"{self.gen_fn.__name__}: site {self.where(address)} called a different "
                        "generative function than in the trace being regenerated."
                    )
                tr, w = gen_fn._regenerate(
                    self.key_for(address), old, self.selection.submap(address), args
                )
                self.weights.append(w)
        finally:
            _state.path.pop()
        self.records[address] = tr
        return tr.retval

    def add_factor(self, address, record):
        method, old = self.method, self.old.get(address)
        if method == "generate":
            self.weights.append(record.log_weight)
        elif method in ("update", "regenerate"):
            prev = old.log_weight if isinstance(old, _FACTORS) else 0.0
            self.weights.append(record.log_weight - prev)
        self.records[address] = record

    # -- after the body ------------------------------------------------------------------
    def finish(self, method_name: str) -> None:
        choice_addresses = [a for a, r in self.records.items() if not isinstance(r, _FACTORS)]
        given = self.constraints if self.method in ("generate", "update", "assess") else ChoiceMap()
        if given.has_value:
            here = format_address(self.path) if self.path else "the top level"
            raise AddressError(
                f"{self.gen_fn.__name__}.{method_name}: got a single value at {here}, but "
                f"`{self.gen_fn.__name__}` is a model whose choices are addresses "
                f"({', '.join(repr(a) for a in choice_addresses) or 'none'}); give a map such "
                f"as {{{format_address(self.path + (choice_addresses[0],) if choice_addresses else self.path)}: value}}."
            )
        for address in given:
            rec = self.records.get(address)
            if rec is None:
                what = "choice" if self.method == "assess" else "constraint"
                raise UnknownAddressError(
                    f"{self.gen_fn.__name__}.{method_name}: {what} {self.where(address)} names "
                    f"no random choice of `{self.gen_fn.__name__}` ({self.gen_fn.location}). "
                    f"Its addresses: {', '.join(repr(a) for a in choice_addresses) or '(none)'}."
                    + suggest(address, choice_addresses)
                )
            if isinstance(rec, _FACTORS) and self.method != "assess":
                raise AddressError(
                    f"{self.gen_fn.__name__}.{method_name}: {self.where(address)} is a factor, "
                    "not a random choice; factors cannot be constrained."
                )
        if self.method == "update":
            for address, rec in self.old.items():
                if address not in self.records:
                    self.weights.append(-record_score(rec))
                    if isinstance(rec, (Site, Observed)):
                        self.discard[address] = rec.value
                    elif isinstance(rec, Trace):
                        self.discard[address] = rec.choices

    def score(self) -> jax.Array:
        return sum_terms(record_score(r) for r in self.records.values())

    def weight(self) -> jax.Array:
        return sum_terms(self.weights)


def sum_terms(xs) -> jax.Array:
    total = jnp.zeros(())
    for x in xs:
        total = total + x
    return total


def run_handler(handler: Handler, fn, args: tuple, method: str):
    """Run `fn(*args)` with `handler` giving the primitives their meaning."""
    stack = _stack()
    stack.append(handler)
    try:
        retval = fn(*args)
    finally:
        stack.pop()
    handler.finish(method)
    return retval


def in_model() -> bool:
    """Whether a DSL body is running (inline calls are allowed only then)."""
    return bool(_stack())
