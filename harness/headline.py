"""The README's headline tables, rendered from a run folder rather than copied by hand.

Contract: ``headline_markdown(run_dir, output_tokens, prompts=None, metric=...)`` reads a run
folder (``matrix.json``, ``raw.csv``), keeps each cell's first ``prompts`` prompts (all when
None: a sweep's rounds, ``harness run --rounds``, measure prompt 0 of every cell first, so
``prompts=1`` is round 0), summarises them as ``harness.report.summarize`` does (medians over
the prompts kept) and returns markdown: ``metric`` at ``output_tokens`` of the single-batch
cells, one row per compared system (the run's order) and one column per input length, `*` on
an extrapolated figure and the best system of each column in bold; then Fiddler's speedup (its
best policy per cell) over each baseline on every single-batch cell kept, as
``harness.report.speedups`` computes it. ``python -m harness headline DIR --output 512
[--prompts 1]`` prints it. An output length or a prompt count the folder does not hold is one
clear error.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.report import load_run, speedups, speedups_markdown, summarize

SCENARIO = "single-batch"
HIGHER_IS_BETTER = {"e2e_tokens_per_s": True, "decode_tokens_per_s": True, "ttft_s": False}


def headline_markdown(
    run_dir: str | Path, output_tokens: int, prompts: int | None = None, metric: str = "e2e_tokens_per_s"
) -> str:
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"--metric must be one of {', '.join(HIGHER_IS_BETTER)}, got {metric!r}")
    matrix, raw = load_run(Path(run_dir))
    if prompts is not None:
        if prompts < 1:
            raise ValueError(f"--prompts must be at least 1, got {prompts}")
        raw = [row for row in raw if int(row["prompt_index"]) < prompts]
    summary = summarize(raw, matrix)
    compared = matrix.get("compared") or matrix["systems"]
    cells = summary[(summary.scenario == SCENARIO) & summary.system.isin(compared)]
    at = cells[cells.output_tokens == output_tokens]
    if at.empty:
        held = sorted(set(cells.output_tokens))
        raise ValueError(f"{run_dir} has no single-batch cell at {output_tokens} output tokens; it holds {held}")
    ratios = speedups(cells, SCENARIO, metric, compared)
    return _table(at, compared, metric) + ("\n" + "\n".join(speedups_markdown(ratios)) + "\n" if len(ratios) else "")


def _table(at: pd.DataFrame, compared: list[str], metric: str) -> str:
    inputs = sorted(set(at.input_tokens))
    measured = at[at[metric].notna()]
    pick = max if HIGHER_IS_BETTER[metric] else min
    best = {i: pick(measured[measured.input_tokens == i][metric], default=None) for i in inputs}
    lines = ["| system | " + " | ".join(f"{i} in" for i in inputs) + " |", "|---" * (len(inputs) + 1) + "|"]
    for system in (s for s in compared if s in set(at.system)):
        shown = []
        for i in inputs:
            row = at[(at.system == system) & (at.input_tokens == i)]
            value = row[metric].iloc[0] if len(row) else None
            if value is None or pd.isna(value):
                shown.append(row.status.iloc[0] if len(row) else "-")
                continue
            text = _three_digits(value) + ("*" if row.status.iloc[0] == "extrapolated" else "")
            shown.append(f"**{text}**" if value == best[i] else text)
        lines.append(f"| {system} | " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n"


def _three_digits(value: float) -> str:
    """Three significant digits, trailing zeros kept (5.90, not 5.9), no bare point (408, not 408.)."""
    return f"{value:#.3g}".rstrip(".")
