"""Benchmarks: each ``benchmarks/bench_*.py`` has a ``main(argv)``; ``run_all`` runs them all."""
