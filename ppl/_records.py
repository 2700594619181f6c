"""The records a DSL trace keeps per address (private; read through `Trace`).

`Choice` (a random choice), `Observed` (an `obs=` site), `Factor`, `Reward`,
`Deterministic`, or a nested `Trace`. Each is a pytree whose type fixes the site's kind,
so the trace's structure says which addresses are choices.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ._trace import Trace

__all__ = ["Choice", "Observed", "Factor", "Reward", "Deterministic", "Assessed", "record_score", "sum_terms", "choice_paths"]


class Choice(NamedTuple):
    """A random choice: its value and its log density (a scalar)."""

    value: Any
    score: jax.Array


class Observed(NamedTuple):
    """An `obs=` site: its value and its log likelihood."""

    value: Any
    score: jax.Array


class Factor(NamedTuple):
    """Soft evidence added to the score."""

    log_weight: jax.Array


class Reward(NamedTuple):
    """A reward factor: the reward and its log weight `beta * link(reward)`."""

    reward: jax.Array
    log_weight: jax.Array


class Deterministic(NamedTuple):
    """A named derived value; no density."""

    value: Any


class Assessed(NamedTuple):
    """A nested call under `assess`, which keeps only its density."""

    score: jax.Array


def record_score(rec) -> jax.Array:
    """The record's contribution to the score."""
    if isinstance(rec, (Factor, Reward)):
        return rec.log_weight
    if isinstance(rec, Deterministic):
        return jnp.zeros(())
    return rec.score


def record_value(rec):
    """What `trace[address]` reads at a record that is not a random choice."""
    if isinstance(rec, Reward):
        return rec.reward
    if isinstance(rec, Factor):
        return rec.log_weight
    return rec.value


def sum_terms(xs) -> jax.Array:
    total = jnp.zeros(())
    for x in xs:
        total = total + x
    return total


def choice_paths(records: dict) -> list[tuple]:
    """Full paths (below this body) of the random choices among `records`."""
    out = []
    for address, rec in records.items():
        if isinstance(rec, Choice):
            out.append((address,))
        elif isinstance(rec, Trace):
            out.extend((address,) + p for p in rec.choices.addresses())
    return out
