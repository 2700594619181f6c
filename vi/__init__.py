"""vi: programmable variational inference on the `ppl` core (DESIGN.md, "vi").

Not yet implemented; tracked as its own issue, which builds on the traced core.
"""

__all__: list[str] = []
