"""The reference posteriors (`data/*.json`, from posteriordb) and the comparison with estimates.

`load(name)` returns a posterior's data block and its reference summaries; `compare`
holds estimated means and sds to them with posteriordb's validation rule: a parameter
passes when its posterior mean is within 0.2 reference sd of the reference mean and
its sd within 20% of the reference sd. `format_table` prints the rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = ["DATA", "names", "load", "Row", "compare", "format_table", "MEAN_TOLERANCE", "SD_TOLERANCE"]

DATA = Path(__file__).resolve().parent / "data"
MEAN_TOLERANCE = 0.2  # |mean - ref mean| / ref sd
SD_TOLERANCE = 0.2  # |sd / ref sd - 1|


def names() -> list[str]:
    """The posteriors with a JSON file in `data/`, sorted."""
    return sorted(p.stem for p in DATA.glob("*.json"))


def load(name: str) -> tuple[dict, dict]:
    """`(data, reference)` of posterior `name`: the Stan data block as JSON values, and
    `{stan_name: {"mean", "sd", "q05", "q95"}}` from posteriordb's reference draws.

    >>> data, reference = load("eight_schools-eight_schools_noncentered")
    >>> data["J"], sorted(reference["tau"])
    (8, ['mean', 'q05', 'q95', 'sd'])
    """
    path = DATA / f"{name}.json"
    if not path.exists():
        raise KeyError(f"no reference posterior {name!r}; known: {', '.join(names())}")
    record = json.loads(path.read_text())
    return record["data"], record["reference"]


def stan_code(name: str) -> str:
    """The Stan program of posterior `name`, the specification its model translates."""
    return json.loads((DATA / f"{name}.json").read_text())["stan_code"]


class Row(NamedTuple):
    """One parameter: reference and estimated mean and sd, the two errors, the verdict."""

    name: str
    ref_mean: float
    ref_sd: float
    mean: float
    sd: float
    mean_error: float  # |mean - ref_mean| / ref_sd
    sd_ratio: float  # sd / ref_sd
    is_pass: bool


def compare(reference: dict, estimates: dict) -> list[Row]:
    """One `Row` per reference parameter, in the reference's order.

    `estimates` maps Stan names to draws (any shape; all draws pooled) or to a
    `(mean, sd)` pair. A parameter missing from `estimates` is a `KeyError`.
    """
    rows = []
    for name, ref in reference.items():
        if name not in estimates:
            raise KeyError(f"no estimate for reference parameter {name!r}; estimates: {', '.join(estimates)}")
        value = estimates[name]
        if isinstance(value, tuple):
            mean, sd = map(float, value)
        else:
            draws = np.asarray(value, dtype=np.float64).ravel()
            mean, sd = float(draws.mean()), float(draws.std(ddof=1))
        mean_error = abs(mean - ref["mean"]) / ref["sd"]
        sd_ratio = sd / ref["sd"]
        is_pass = bool(mean_error <= MEAN_TOLERANCE and abs(sd_ratio - 1.0) <= SD_TOLERANCE)
        rows.append(Row(name, ref["mean"], ref["sd"], mean, sd, mean_error, sd_ratio, is_pass))
    return rows


def format_table(rows: list[Row]) -> str:
    """The rows as a fixed-width table, one line per parameter."""
    header = (f"{'parameter':<12} {'ref mean':>11} {'ref sd':>10} {'mean':>11} {'sd':>10} "
              f"{'|dm|/sd':>8} {'sd ratio':>8}  ok")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.name:<12} {r.ref_mean:>11.4g} {r.ref_sd:>10.4g} {r.mean:>11.4g} {r.sd:>10.4g} "
            f"{r.mean_error:>8.3f} {r.sd_ratio:>8.3f}  {'yes' if r.is_pass else 'NO'}"
        )
    return "\n".join(lines)
