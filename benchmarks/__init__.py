"""Benchmarks of issue #5: `python -m benchmarks` (see benchmarks/__main__.py and docs/performance.md)."""
