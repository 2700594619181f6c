"""A Griffe extension that adapts this project's docstrings to the Google style renderer.

Loaded by mkdocstrings (see `extensions` in mkdocs.yml); it changes only what the API
pages show, never the code or its doctests:

- Doctest examples (`>>> ...` lines and their expected output) written directly in a
  docstring, outside an `Examples:` section, are wrapped in a fenced Python code block.
  Markdown would otherwise read every `>>>` line as a triple-nested block quote.
- A `Fields:` block (the project's name for the fields of a record class, e.g.
  `ppl.Trace`, `ppl.Site`, `inference.ImportanceResult`) is read as the Google
  `Attributes:` section, so it renders as a table instead of one run-on paragraph.
"""

from __future__ import annotations

from typing import Any

import griffe


def fence_doctests(text: str) -> str:
    """Wrap each doctest example at the left margin in a fenced code block.

    An example is a `>>>` line and every line after it up to the next blank line
    (doctest's own rule). Examples indented under a Google section such as `Examples:`
    are left for the section's parser.
    """
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        if not lines[i].startswith(">>>"):
            out.append(lines[i])
            i += 1
            continue
        if out and out[-1].strip():
            out.append("")
        out.append("```python")
        while i < len(lines) and lines[i].strip():
            out.append(lines[i])
            i += 1
        out.append("```")
    return "\n".join(out)


def fields_as_attributes(text: str) -> str:
    """Read a `Fields:` header line as the Google `Attributes:` section header."""
    return "\n".join("Attributes:" if line == "Fields:" else line for line in text.split("\n"))


class ProjectDocstrings(griffe.Extension):
    """Apply `fence_doctests` and `fields_as_attributes` to every docstring."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.is_alias or obj.docstring is None:
            return
        obj.docstring.value = fence_doctests(fields_as_attributes(obj.docstring.value))
