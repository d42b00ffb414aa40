"""Benchmark: a FlexAI kernel on the local emulator against a local ``python3`` kernel.

``python -m bench`` (or ``make bench``) measures both in one run and writes
``bench/results.json``; see ``bench/README.md``.
"""
