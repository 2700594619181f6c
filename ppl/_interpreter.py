"""The interpreter behind the DSL: one small run class per GFI method over a shared site protocol.

A GFI method of a `@gen` function runs the body once, while tracing, under a `Run` of
that method. Each primitive builds a `Site` (`_site.py`), passes it through the
installed site handlers, and hands it to the run, which draws or reads the value,
accumulates the score and the importance weight, and records the site. The base class
holds what every method shares (recording, checks, key derivation, the end-of-body
checks); a subclass says only what its method does with a site whose value is given,
a site whose value is not, and a piece of evidence. No state survives the run.

A DSL trace's `inner` is a dict address -> record (`_records.py`): `Choice` for a random
choice, `Observed` for an `obs=` site, `Factor` and `Reward` for soft evidence,
`Deterministic` for a named derived value, and a `Trace` for a nested call.

The rule for observed values: a choice map (constraints, `assess`'s choices,
`trace.choices`) holds random choices only. `obs=` sites, factors, rewards and
deterministic values are part of the model, not choices: `trace[address]` reads them,
the score counts them, and naming them in a choice map is an error that says so.
So `generate(key, trace.choices, args)` reproduces `trace.score` for every model.
"""

from __future__ import annotations

import os
import sys
import threading
import traceback

import jax
import jax.numpy as jnp
from numpyro.distributions import ImproperUniform

from . import _keys
from ._choicemap import ChoiceMap
from ._distribution import log_density, prepare_value
from ._errors import (
    AddressError,
    ArgumentError,
    ControlFlowError,
    DuplicateAddressError,
    UnknownAddressError,
    format_address,
    suggest,
)
from ._records import Assessed, Choice, Deterministic, Factor, Observed, Reward, choice_paths, record_score, sum_terms
from ._selection import Selection
from ._site import Site, apply_handlers
from ._trace import Trace

__all__ = ["RUNS", "current_run", "current_path", "in_model", "run_body"]

_PPL_DIR = os.path.dirname(os.path.abspath(__file__))
_state = threading.local()


def _runs() -> list:
    if not hasattr(_state, "runs"):
        _state.runs = []
        _state.path = []
    return _state.runs


def current_path() -> tuple:
    _runs()
    return tuple(_state.path)


def in_model() -> bool:
    """Whether a DSL body is running (inline calls are allowed only then)."""
    return bool(_runs())


def current_run(what: str) -> Run:
    runs = _runs()
    if not runs:
        raise ArgumentError(
            f"{what} was called outside a generative function. Decorate the model with "
            "@ppl.gen and run it through a GFI method, e.g. model.simulate(key, args)."
        )
    return runs[-1]


def _user_location() -> str:
    """file:line of the innermost frame outside this package (the model's line)."""
    frame = sys._getframe(1)
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == _PPL_DIR:
        frame = frame.f_back
    if frame is None:
        return "<unknown>"
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"


_KIND_OF = {Observed: "observed", Factor: "factor", Reward: "reward", Deterministic: "deterministic"}
_NOT_A_CHOICE = {
    "observed": "is observed with obs= inside the model, so it is not a random choice",
    "factor": "is a factor, not a random choice",
    "reward": "is a reward factor, not a random choice",
    "deterministic": "is a deterministic value (ppl.deterministic), not a random choice",
}


class Run:
    """One GFI call of one DSL function. Subclasses: one per method."""

    method = ""
    what_given = "constraint"  # how messages name a value supplied by the caller

    def __init__(self, gen_fn, key=None, given=None, old=None, selection=None):
        self.gen_fn = gen_fn
        self.key = key
        self.given = given if given is not None else ChoiceMap()
        self.old = old if old is not None else {}
        self.selection = selection if selection is not None else Selection.none()
        self.records: dict = {}
        self.locations: dict = {}
        self.weights: list = []
        self.discard: dict = {}
        self.path = current_path()

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
        if address in self.locations:
            raise DuplicateAddressError(
                f"{self.gen_fn.__name__}: address {self.where(address)} is used twice, at "
                f"{self.locations[address]} and at {here}. Every sample, factor, reward and "
                "deterministic in one execution needs its own address; inside a Python loop "
                "write f'x_{i}', or use ppl.vmap / ppl.scan for repeated structure."
            )
        self.locations[address] = here

    def site(self, kind, address, fn=None, args=(), value=None) -> Site:
        site = Site(kind, address, self.path + (address,), fn, args, value, 1.0, self.method)
        return apply_handlers(site)

    def given_value(self, address):
        """The caller's value for a distribution site, or None."""
        if address not in self.given:
            return None
        sub = self.given.get_submap(address)
        if not sub.has_value:
            raise AddressError(
                f"{self.gen_fn.__name__}: {self.what_given} at {self.where(address)} is a nested "
                "map, but the site is a distribution; give its value directly."
            )
        return sub[()]

    def old_record(self, address, kind):
        """The previous trace's record at `address` if it is of type `kind`.

        A record of another kind (the model's structure changed) is retired here: its
        score leaves the weight and its choices go to the discard.
        """
        old = self.old.get(address)
        if old is None or isinstance(old, kind):
            return old
        if isinstance(old, Trace) and kind is Trace:
            return old
        self.retire(address, old)
        return None

    def retire(self, address, old) -> None:
        """Hook: a previous record that the new execution does not reproduce."""

    def site_key(self, address):
        return _keys.site_key(self.key, address)

    # -- the primitives --------------------------------------------------------------------
    def sample_distribution(self, address, d, obs):
        if obs is not None:
            site = self.site("observed", address, d, value=obs)
        else:
            site = self.site("latent", address, d, value=self.given_value(address))
        if obs is not None:
            value, lp = self.checked(site, "observation")
            self.evidence(address, Observed, lp)
            self.records[address] = Observed(value, lp)
            return value
        old = self.old_record(address, Choice)
        if site.value is not None:
            value, lp = self.checked(site, self.what_given)
            self.latent_given(address, lp, old)
        else:
            value, lp = self.latent_free(site, old)
        self.records[address] = Choice(value, lp)
        return value if site.to_model is None else site.to_model(value)

    def checked(self, site: Site, what: str):
        """`(value, scaled log density)` of a value supplied from outside the model."""
        value, ok = prepare_value(site.path, site.fn, site.value, what)
        lp = log_density(site.fn, value, check_support=True)
        if ok is not None:
            lp = jnp.where(ok, lp, -jnp.inf)
        return value, site.scale * lp

    def draw(self, site: Site):
        if isinstance(site.fn, ImproperUniform):
            raise ArgumentError(
                f"{self.gen_fn.__name__}.{self.method}: site {format_address(site.path)} has an improper prior "
                f"({type(site.fn).__name__}, support {site.fn.support}), which cannot be drawn. "
                "Give its value as a constraint; for MCMC, give a start with init={...} or use "
                "init_strategy='uniform' (run_nuts' default), which starts it on the real line."
            )
        value = _keys.draw(site.fn, self.site_key(site.address))
        return value, site.scale * log_density(site.fn, value, check_support=False)

    def keep(self, site: Site, old: Choice):
        """The previous value under the site's (possibly moved) distribution."""
        lp = site.scale * log_density(site.fn, old.value, check_support=True)
        self.weights.append(lp - old.score)
        return old.value, lp

    def add_factor(self, address, record):
        self.evidence(address, type(record), record.log_weight)
        self.records[address] = record

    def deterministic(self, address, value):
        self.old_record(address, Deterministic)
        self.records[address] = Deterministic(value)

    def call(self, address, gen_fn, args):
        _state.path.append(address)
        try:
            record, retval = self.nested(address, gen_fn, args)
        finally:
            _state.path.pop()
        self.records[address] = record
        return retval

    # -- what a method does (subclasses) -----------------------------------------------------
    def latent_given(self, address, lp, old):
        """A random choice whose value the caller (or a handler) supplied."""

    def latent_free(self, site, old):
        """A random choice with no supplied value: `(value, log density)`."""
        return self.draw(site)

    def evidence(self, address, kind, term):
        """An observed site, factor or reward contributing `term` to the score."""

    def nested(self, address, gen_fn, args):
        """A nested generative function: `(record, retval)`."""
        raise NotImplementedError

    # -- after the body ----------------------------------------------------------------------
    def finish(self, method_name: str) -> None:
        choice_addresses = [a for a, r in self.records.items() if isinstance(r, (Choice, Trace, Assessed))]
        if self.given.has_value:
            here = format_address(self.path) if self.path else "the top level"
            example = self.path + (choice_addresses[0],) if choice_addresses else self.path
            raise AddressError(
                f"{self.gen_fn.__name__}.{method_name}: got a single value at {here}, but "
                f"`{self.gen_fn.__name__}` is a model whose choices are addresses "
                f"({', '.join(repr(a) for a in choice_addresses) or 'none'}); give a map such "
                f"as {{{format_address(example)}: value}}."
            )
        for address in self.given:
            rec = self.records.get(address)
            if rec is None:
                candidates = [self.path + p for p in choice_paths(self.records)]
                raise UnknownAddressError(
                    f"{self.gen_fn.__name__}.{method_name}: {self.what_given} "
                    f"{self.where(address)} names no random choice of `{self.gen_fn.__name__}` "
                    f"({self.gen_fn.location}). Its random choices: "
                    f"{', '.join(format_address(c) for c in candidates) or '(none)'}."
                    + suggest(self.path + (address,), candidates)
                )
            kind = _KIND_OF.get(type(rec))
            if kind is not None:
                hint = (
                    " Drop it from the choice map; the model supplies its value."
                    if kind == "observed"
                    else " Only random choices can be given."
                )
                raise AddressError(
                    f"{self.gen_fn.__name__}.{method_name}: {self.what_given} {self.where(address)} "
                    f"{_NOT_A_CHOICE[kind]}.{hint}"
                )
        for address, old in self.old.items():
            if address not in self.records:
                self.retire(address, old)

    def score(self) -> jax.Array:
        return sum_terms(record_score(r) for r in self.records.values())

    def weight(self) -> jax.Array:
        return sum_terms(self.weights)


class Simulate(Run):
    method = "simulate"
    what_given = "value"

    def nested(self, address, gen_fn, args):
        tr = gen_fn._simulate(self.site_key(address), args)
        return tr, tr.retval


class Assess(Run):
    method = "assess"
    what_given = "choice"

    def latent_free(self, site, old):
        candidates = [a for a in self.given]
        raise UnknownAddressError(
            f"{self.gen_fn.__name__}.assess: no value for random choice {self.where(site.address)}; "
            "assess needs every random choice of the model." + suggest(site.address, candidates)
        )

    def nested(self, address, gen_fn, args):
        lp, retval = gen_fn._assess(self.given.get_submap(address), args)
        return Assessed(lp), retval


class Generate(Run):
    method = "generate"

    def latent_given(self, address, lp, old):
        self.weights.append(lp)

    def evidence(self, address, kind, term):
        self.weights.append(term)

    def nested(self, address, gen_fn, args):
        tr, w = gen_fn._generate(self.site_key(address), self.given.get_submap(address), args)
        self.weights.append(w)
        return tr, tr.retval


class Update(Run):
    """weight = new score - old score - log q(choices drawn fresh from the prior)."""

    method = "update"

    def retire(self, address, old):
        self.weights.append(-record_score(old))
        if isinstance(old, Choice):
            self.discard[address] = old.value
        elif isinstance(old, Trace):
            choices = old.choices
            if not choices.is_empty:
                self.discard[address] = choices

    def latent_given(self, address, lp, old):
        if old is None:
            self.weights.append(lp)
        else:
            self.discard[address] = old.value
            self.weights.append(lp - old.score)

    def latent_free(self, site, old):
        return self.draw(site) if old is None else self.keep(site, old)

    def evidence(self, address, kind, term):
        old = self.old_record(address, kind)
        self.weights.append(term if old is None else term - record_score(old))

    def nested(self, address, gen_fn, args):
        old = self.old_record(address, Trace)
        sub = self.given.get_submap(address)
        if old is None or old.gen_fn != gen_fn:
            if old is not None:
                self.retire(address, old)
            tr, w = gen_fn._generate(self.site_key(address), sub, args)
        else:
            tr, w, discard = gen_fn._update(self.site_key(address), old, sub, args)
            if not discard.is_empty:
                self.discard[address] = discard
        self.weights.append(w)
        return tr, tr.retval


class Regenerate(Update):
    """weight = sum over kept choices and evidence of (new - old) log density."""

    method = "regenerate"
    what_given = "value"

    def latent_given(self, address, lp, old):
        self.weights.append(lp if old is None else lp - old.score)

    def latent_free(self, site, old):
        if old is None or site.address in self.selection:
            return self.draw(site)
        return self.keep(site, old)

    def nested(self, address, gen_fn, args):
        old = self.old_record(address, Trace)
        if old is None or old.gen_fn != gen_fn:
            if old is not None:
                self.retire(address, old)
            tr = gen_fn._simulate(self.site_key(address), args)
            w = gen_fn._project(tr, Selection.none())  # fresh from the prior: only evidence weighs
        else:
            tr, w = gen_fn._regenerate(self.site_key(address), old, self.selection.submap(address), args)
        self.weights.append(w)
        return tr, tr.retval


RUNS = {cls.method: cls for cls in (Simulate, Assess, Generate, Update, Regenerate)}


# ----------------------------------------------------------------------------------------
# Running a body
# ----------------------------------------------------------------------------------------

_LIBRARY_DIRS = tuple(
    os.path.dirname(os.path.abspath(m.__file__))
    for m in (jax, sys.modules["numpyro"]) if getattr(m, "__file__", None)
) + (_PPL_DIR,)
_CONTROL_FLOW_ERRORS = (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError)


def run_body(run: Run, fn, args: tuple, method_name: str):
    """Run `fn(*args)` with `run` giving the primitives their meaning."""
    runs = _runs()
    runs.append(run)
    try:
        retval = fn(*args)
    except _CONTROL_FLOW_ERRORS as e:
        raise _control_flow_error(run, e) from e
    finally:
        runs.pop()
    run.finish(method_name)
    return retval


def _control_flow_error(run: Run, e: Exception) -> ControlFlowError:
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if not os.path.abspath(f.filename).startswith(_LIBRARY_DIRS)]
    frame = frames[-1] if frames else None
    where = f" at {os.path.basename(frame.filename)}:{frame.lineno}" if frame else ""
    code = f" (`{frame.line.strip()}`)" if frame and frame.line else ""
    return ControlFlowError(
        f"{run.gen_fn.__name__}: a traced value decides Python control flow{where}{code}. A "
        "random choice (or an array argument under jit/vmap) has no single value while the "
        "model is traced, so Python `if`, `while`, `bool()`, `int()` or `float()` cannot "
        "branch on it. Use ppl.switch(branch_a, branch_b) with an integer index to choose "
        "between sub-models, or jnp.where(condition, a, b) to choose between values."
    )
