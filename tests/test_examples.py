"""The examples run end to end: the tour script (the project's main job) and the notebook."""

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
    ]:
        assert expected in out, f"missing {expected!r} in tour output:\n{out}"


def test_quickstart_notebook_executes():
    # nbformat, nbclient, ipykernel and matplotlib come with the `dev` extra: a missing one
    # is a broken install and fails here, rather than skipping the notebook silently.
    import nbclient
    import nbformat

    nb = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
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
    assert not errors, f"notebook cell errored: {errors[0].get('ename')}: {errors[0].get('evalue')}"
