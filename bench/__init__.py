"""Benchmarks for divprune_ext: `python -m bench --help`."""
