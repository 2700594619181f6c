"""vi: programmable variational inference on the `ppl` core.

Not yet implemented; tracked as its own issue. Per-site gradient estimators will be
site handlers (`ppl.handle`, `ppl.SiteHandler`) that wrap each guide site's distribution.
"""

__all__: list[str] = []
