"""Benchmarks, run from the repository root as modules: ``python -m benchmarks.distill_step``."""
