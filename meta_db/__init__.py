"""meta_db: the meta-knowledge store (datasets, pipelines, runs) and the zero-shot pipeline selector."""
