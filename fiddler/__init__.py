"""Fiddler: CPU-GPU orchestration for Mixture-of-Experts inference (a reference reproduction)."""

__version__ = "0.1.0"
