"""Benchmark tools for `make bench`: load generator, CPU accounting, empty decision server."""
