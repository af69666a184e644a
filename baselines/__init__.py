"""The systems Fiddler is compared with, behind one interface and one GPU memory budget.

Empty until the baselines issue (#4) lands: nothing here is implemented yet. Contract to keep:
``baselines`` may import ``fiddler`` but never ``harness``.
"""
