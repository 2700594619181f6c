"""smc: particle filters, tempered SMC and LLM inference-time scaling on the `ppl` core.

Not yet implemented; tracked as its own issue. It builds on `ppl.scan`'s step-at-a-time
interface (`ScanGF.step` / `assemble`) and on `ppl.particle_key`.
"""

__all__: list[str] = []
