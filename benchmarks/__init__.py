"""Benchmarks of calgan_fast. Run from the repository root: the pytest-benchmark suites as
``python -m pytest benchmarks/bench_<thing>.py``, the scripts as ``python -m benchmarks.<name>``."""
