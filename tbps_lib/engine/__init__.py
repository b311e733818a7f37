"""Evaluation engine: training loop, encoding and evaluation, retrieval metrics and re-ranking."""
