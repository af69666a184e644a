"""Workloads, the timing protocol, sweeps, tables and plots (``python -m harness``).

Contract to keep: ``harness`` may import ``fiddler`` and ``baselines``; neither imports
``harness``.
"""
