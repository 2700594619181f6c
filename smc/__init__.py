"""smc: particle filters, tempered SMC and LLM inference-time scaling on the `ppl` core
(DESIGN.md, "smc").

Not yet implemented; tracked as its own issue, which builds on the traced core.
"""

__all__: list[str] = []
