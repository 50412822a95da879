"""Benchmarks: `python -m minilm.bench <op> [--device cpu|cuda] [--json]`.

Every benchmark times minilm and the peers a user would otherwise use on the same inputs, in one
process, and prints one row per (shape, pass, implementation). attention, charcnn, elmo and lightconv
time the implementations in alternating rounds, so that a change of the machine's load during the run
falls on all of them alike (the median of single calls, common.time_interleaved, which takes each round in
a random order and flushes a GPU's L2 cache before every call; lightconv: the best of its
rounds); gpt1 builds, times and frees one model after
the other, so that only one model's weights, optimizer state and compiled graphs are held at a time.
"""
