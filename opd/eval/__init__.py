"""Evaluation: benchmark loaders and pass@k / maj@n estimators."""
