"""Check NUTS against posteriordb's reference posteriors.

    python examples/posteriordb/run.py [--quick] [--float32] [names...]

For each posterior (all twelve, or those whose name contains one of `names`), runs
`inference.run_nuts` with 4 chains on the model of `models.py`, prints the reference and
estimated mean and sd of every parameter, and a summary line: PASS when every mean is
within 0.2 reference sd of the reference mean and every sd within 20% of the reference
sd (posteriordb's rule). Exits with status 1 when a posterior fails.

Runs in float64 by default, as Stan does: `gp_pois_regr` needs it (its covariance is
too ill-conditioned for a float32 Cholesky factor), and `--float32` shows the others.
`diamonds` is slow: NUTS takes ~1000 leapfrog steps per draw (maximum tree depth)
on its correlated predictors.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `posteriordb` as a package

import inference  # noqa: E402
from posteriordb import models, reference  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="run only posteriors whose name contains one of these")
    parser.add_argument("--quick", action="store_true", help="500 warmup steps and 500 draws per chain")
    parser.add_argument("--float32", action="store_true", help="run in float32 (default float64)")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", not options.float32)
    num_warmup, num_samples = (500, 500) if options.quick else (1000, 1000)

    selected = [n for n in models.POSTERIORS if not options.names or any(s in n for s in options.names)]
    if not selected:
        parser.error(f"no posterior matches {options.names}; known: {', '.join(models.POSTERIORS)}")
    summaries = []
    for name in selected:
        posterior = models.POSTERIORS[name]
        data, ref = reference.load(name)
        start = time.perf_counter()
        samples = inference.run_nuts(
            jax.random.key(options.seed), posterior.model, posterior.args(data), posterior.observations(data),
            num_warmup=num_warmup, num_samples=num_samples, num_chains=4,
        )
        estimates = posterior.parameters(samples)
        seconds = time.perf_counter() - start
        rows = reference.compare(ref, estimates)
        passed = sum(r.is_pass for r in rows)
        verdict = "PASS" if passed == len(rows) else "FAIL"
        divergences = int(samples.divergences.sum())
        print(f"\n=== {name}")
        print(reference.format_table(rows))
        line = (f"{verdict}  {name}: {passed}/{len(rows)} parameters within tolerance, "
                f"{divergences} divergences, {seconds:.1f} s")
        print(line)
        summaries.append(line)
    print("\n" + "\n".join(summaries))
    return 0 if all(s.startswith("PASS") for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
