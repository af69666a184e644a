"""Imports point one way: fiddler -> baselines -> harness, never back."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"fiddler": {"baselines", "harness"}, "baselines": {"harness"}}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_imports_point_one_way():
    for package, forbidden in FORBIDDEN.items():
        for path in (ROOT / package).rglob("*.py"):
            bad = imported_packages(path) & forbidden
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_no_clock_reads_outside_the_timing_module():
    for package in ("fiddler", "baselines", "harness"):
        for path in (ROOT / package).rglob("*.py"):
            if path.name == "timing.py":
                continue
            text = path.read_text()
            assert "time.perf_counter" not in text and "time.time(" not in text, path
