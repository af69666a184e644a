"""The README's file tree stays true: every source file is listed, and every listed path exists."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tree_entries() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## Files", 1)[1].split("```", 2)[1]
    return [line.split()[0] for line in block.splitlines() if line.strip()]


def test_every_listed_path_exists():
    for entry in tree_entries():
        assert (ROOT / entry).exists(), f"README lists {entry}, which does not exist"


def test_every_source_file_is_listed():
    listed = set(tree_entries())
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for path in files:
        if re.match(r"(fiddler|baselines|harness|experiments|tests)/.*\.py$", path):
            assert path in listed, f"README's file tree does not list {path}"
