"""The documentation builds with warnings as errors (`mkdocs build --strict`).

A broken link, a page missing from the nav, or an API entry (`::: ppl.name`) whose
name no longer exists fails the build. mkdocs and mkdocstrings come with the `dev`
extra, so a missing mkdocs is a failure here, not a skip.
"""

import importlib.util
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_docs_build_strict(tmp_path):
    needed = ("mkdocs", "mkdocstrings", "mkdocstrings_handlers")
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    assert not missing, f"{missing} not installed; run pip install -e '.[dev]'"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (
        f"mkdocs build --strict failed (exit {proc.returncode}).\n"
        f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    )
