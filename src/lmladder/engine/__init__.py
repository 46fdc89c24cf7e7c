"""Shared machinery the rungs call: log-likelihood scoring and SFT data/training glue."""
