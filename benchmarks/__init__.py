"""bench.py's pieces: what is timed (plans, modes), how (timing), the data pipeline, the models, the report."""
