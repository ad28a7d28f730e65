"""Benchmarks: ``python -m benchmarks`` runs all of them; ``python -m benchmarks.bench_<name>`` runs one."""
