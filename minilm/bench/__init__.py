"""Benchmarks: `python -m minilm.bench <op> [--device cpu|cuda] [--json]`.

Every benchmark times minilm and the peers a user would otherwise use on the same inputs, in one
process, one after the other, and prints one row per (shape, pass, implementation).
"""
