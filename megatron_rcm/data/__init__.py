"""Data: DALI video pipelines, precomputed-latent shards, synthetic data."""
