"""Workloads, the timing protocol, sweeps, tables and plots.

Empty until the harness issue (#5) lands: nothing here is implemented yet. Contract to keep:
``harness`` may import ``fiddler`` and ``baselines``; neither imports ``harness``.
"""
