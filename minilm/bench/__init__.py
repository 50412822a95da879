"""Benchmarks: `python -m minilm.bench <op> [--device cpu|cuda] [--json]`.

Every benchmark times minilm and the peers a user would otherwise use on the same inputs, in one
process, and prints one row per (shape, pass, implementation). attention, charcnn, elmo and lightconv
time the implementations in alternating rounds (common.time_interleaved), so that a change of the
machine's load during the run falls on all of them alike; gpt1 builds, times and frees one model after
the other, so that only one model's weights, optimizer state and compiled graphs are held at a time.
"""
