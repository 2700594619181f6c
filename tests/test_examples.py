"""The examples run end to end: the tour script (the project's main job) and the notebook.

The tour's printed numbers are checked against the exact answers it prints beside them.
"""

import math
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_tour_quick_runs_and_prints_every_section():
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "tour.py"), "--quick"],
        capture_output=True, text=True, timeout=300, cwd=EXAMPLES.parent,
    )
    assert proc.returncode == 0, f"tour.py failed:\n{proc.stdout}\n{proc.stderr}"
    out = proc.stdout
    for expected in [
        "=== (a)", "=== (b)", "=== (c)", "=== (d)", "=== (e)", "=== (f)",
        "assess equals score: True",
        "log weight",
        "ESS",
        "SIR: 1000 resampled traces",
        "known noise, slope posterior",
        "Kalman filter (exact)",
        "MH chain",
        "UnknownAddressError",
        "Did you mean 'slope'?",
        "tour finished",
        "=== (g)",
        "=== (h)", "r_hat", "posterior predictive ys: shape (4, 300, 10)",
        "=== (i)", "paths(): z of shape (500, 50)",
        "=== (j)", "hand-written IWAE (K = 16)",
        "=== (k)", "chosen answer (weighted vote)",
    ]:
        assert expected in out, f"missing {expected!r} in tour output:\n{out}"
    _check_tour_numbers(out)


NUM = r"(-?\d+\.\d+)"


def _numbers(pattern, out):
    match = re.search(pattern, out)
    assert match, f"no line matching {pattern!r} in tour output:\n{out}"
    return [float(g) for g in match.groups()]


def _check_tour_numbers(out):
    # Conjugate slope posterior: the weighted mean of importance draws has s.e. about
    # posterior sd / sqrt(ESS); 5 s.e. (false alarm ~6e-7; the seed is fixed anyway).
    est, _, exact, exact_sd, ess = _numbers(
        rf"estimate {NUM} \+- {NUM}\s+exact {NUM} \+- {NUM}\s+ESS = {NUM}", out)
    assert abs(est - exact) < 5 * exact_sd / math.sqrt(ess)
    # Evidence of the random walk: importance vs the Kalman filter. The log of an
    # importance estimate has s.e. about sqrt(1/ESS - 1/N) (delta method); 5 s.e.
    lm, kalman, ess, n = _numbers(rf"importance {NUM}\s+Kalman filter \(exact\) {NUM}\s+ESS = {NUM} of (\d+)", out)
    assert abs(lm - kalman) < 5 * math.sqrt(1 / ess - 1 / n)
    # The first 5 steps, where the ESS is in the hundreds: a sharp check (a bias of
    # log 2 in the estimator fails it).
    lm, kalman, ess, n = _numbers(rf"first 5 steps: importance {NUM}\s+Kalman filter \(exact\) {NUM}\s+ESS = {NUM} of (\d+)", out)
    assert ess > 100
    assert abs(lm - kalman) < 5 * math.sqrt(1 / ess - 1 / n)
    # NUTS on the known-noise model: the chain mean has s.e. about sd / sqrt(bulk ESS);
    # 5 s.e. as above.
    est, _, exact, exact_sd, ess = _numbers(
        rf"NUTS, known noise: slope {NUM} \+- {NUM}\s+exact {NUM} \+- {NUM}\s+bulk ESS = (\d+)", out)
    assert ess > 100
    assert abs(est - exact) < 5 * exact_sd / math.sqrt(ess)
    # Particle filter vs Kalman: one run is within 5 sd of the spread over seeds, plus the
    # low bias of log Z (about Var / 2); the mean of 10 seeds within 5 sd / sqrt(10) + Var / 2.
    lm, kalman = _numbers(rf"log marginal {NUM}\s+Kalman filter \(exact\) {NUM}\s+resampled", out)
    mean, sd = _numbers(rf"over 10 seeds: mean {NUM}, sd {NUM}", out)
    assert abs(lm - kalman) < 5 * sd + sd**2 / 2
    assert abs(mean - kalman) < 5 * sd / math.sqrt(10) + sd**2 / 2
    # VI on the known-noise model: the Gaussian guide family contains the posterior, so
    # the fit is exact up to the SGD noise left after a decayed learning rate (about 0.01
    # posterior sd here); 0.2 posterior sd still fails a wrong gradient or a wrong scale.
    loc, sd, exact, exact_sd = _numbers(rf"VI, known noise: slope {NUM} \+- {NUM}\s+exact {NUM} \+- {NUM}", out)
    assert abs(loc - exact) < 0.2 * exact_sd
    assert abs(sd - exact_sd) < 0.2 * exact_sd
    # Identities, to the printed precision.
    vmap_lm, flat_lm = _numbers(rf"vmap model: log marginal {NUM} \(flat model, same key: {NUM}\)", out)
    assert vmap_lm == flat_lm  # same particle keys, same sites: the same particles
    w, diff = _numbers(rf"log weight {NUM} = new score - old score {NUM}", out)
    assert abs(w - diff) <= 2e-3
    noise, exp_log_noise = _numbers(rf"deterministic noise = {NUM} = exp\(log_noise\) = {NUM}", out)
    assert noise == exp_log_noise
    tempered, by_hand = _numbers(rf"tempered \(beta = 0.5\) log density {NUM} = prior \+ 0.5 \* likelihood {NUM}", out)
    assert abs(tempered - by_hand) <= 1e-5 * abs(by_hand) + 1e-3
    lp, by_hand = _numbers(rf"unconstrained log density {NUM} = log density \+ log\|d rate/du\| {NUM}", out)
    assert abs(lp - by_hand) <= 1e-5 * abs(by_hand) + 1e-3


def _execute_notebook(name):
    # nbformat, nbclient, ipykernel, matplotlib and arviz come with the `dev` extra: a
    # missing one is a broken install and fails here, rather than skipping silently.
    import nbclient
    import nbformat

    nb = nbformat.read(EXAMPLES / name, as_version=4)
    # "python3" is ipykernel's spec in this environment; jupyter_client starts it with
    # sys.executable, so the kernel sees the same packages as the test.
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(EXAMPLES)}}
    )
    client.execute()
    errors = [
        out for cell in nb.cells if cell.cell_type == "code"
        for out in cell.get("outputs", []) if out.get("output_type") == "error"
    ]
    assert not errors, f"{name}: cell errored: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    return nb


def test_quickstart_notebook_executes():
    _execute_notebook("quickstart.ipynb")


def test_mcmc_notebook_executes():
    nb = _execute_notebook("mcmc.ipynb")
    text = "".join(
        out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )
    assert "r_hat" in text and "divergences per chain" in text


def test_vi_notebook_executes():
    nb = _execute_notebook("vi.ipynb")
    text = "".join(
        out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )
    assert "posterior: mean" in text and "d/dlog_s" in text and "test log p(x)" in text


def test_smc_notebook_executes():
    nb = _execute_notebook("smc.ipynb")
    text = "".join(
        out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )
    for expected in ["Kalman filter (exact)", "systematic", "paths['x']: (1000, 50)", "the band covers",
                     "tempered SMC", "CSMC mean"]:
        assert expected in text, f"smc.ipynb: no {expected!r} in its output"


def test_llm_inference_scaling_notebook_executes():
    nb = _execute_notebook("llm_inference_scaling.ipynb")
    text = "".join(
        out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )
    for expected in ["particle 0:", "calculator reward", "proposal at temperature", "returned 1.9"]:
        assert expected in text, f"llm_inference_scaling.ipynb: no {expected!r} in its output"
