"""posteriordb reference posteriors in the DSL: models, reference summaries, and a NUTS check (run.py)."""
