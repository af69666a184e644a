"""Scenarios and grids: which (input, output, beam width) cells a sweep measures.

Contract: ``cells(scenario, grid=..., inputs=..., outputs=..., beam_widths=...)`` returns the
``Cell``s of a scenario. ``runs(cells)`` groups them into the generations that measure them:
greedy generation is prefix-closed (the first k tokens of a longer greedy run are the k-token
run), so one single-batch generation per input length, of the longest output, yields every
shorter output length (those cells are marked derived); beam search is not prefix-closed, so
each beam cell is its own run.

- ``single-batch``: grid ``paper-v1`` (inputs 16-128 x outputs 16-512), ``paper-v3`` (inputs
  32-256 x outputs 64-512), or custom lists.
- ``long-prefill``: time to first token for 512 ... 8192 input tokens (output 1).
- ``beam-search``: widths 4, 8, 16 (the paper does not state its widths), input 32, output
  64 by default.
"""

from __future__ import annotations

import dataclasses

GRIDS = {
    "paper-v1": ((16, 32, 64, 128), (16, 32, 64, 128, 256, 512)),
    "paper-v3": ((32, 64, 128, 256), (64, 128, 256, 512)),
}
LONG_PREFILL_INPUTS = (512, 1024, 2048, 4096, 8192)  # prompt lengths of the authors' scripts
BEAM_WIDTHS = (4, 8, 16)
BEAM_INPUT, BEAM_OUTPUT = 32, 64
SCENARIOS = ("single-batch", "long-prefill", "beam-search")


@dataclasses.dataclass(frozen=True, order=True)
class Cell:
    scenario: str
    input_tokens: int
    output_tokens: int
    beam_width: int = 1


@dataclasses.dataclass(frozen=True, order=True)
class Run:
    """One generation per prompt: ``cells`` are read off its prefix."""

    scenario: str
    input_tokens: int
    output_tokens: int  # the longest output among its cells
    beam_width: int
    cells: tuple[Cell, ...]


def cells(
    scenario: str,
    grid: str | None = None,
    inputs: tuple[int, ...] | None = None,
    outputs: tuple[int, ...] | None = None,
    beam_widths: tuple[int, ...] | None = None,
) -> list[Cell]:
    if scenario not in SCENARIOS:
        raise ValueError(f"--scenario must be one of {', '.join(SCENARIOS)}, got {scenario!r}")
    if grid is not None and grid not in GRIDS:
        raise ValueError(f"--grid must be one of {', '.join(GRIDS)}, got {grid!r}")
    if scenario == "single-batch":
        default_inputs, default_outputs = GRIDS[grid or "paper-v3"]
        return [Cell(scenario, i, o) for i in inputs or default_inputs for o in outputs or default_outputs]
    if scenario == "long-prefill":
        return [Cell(scenario, i, 1) for i in inputs or LONG_PREFILL_INPUTS]
    return [
        Cell(scenario, i, o, w)
        for w in beam_widths or BEAM_WIDTHS
        for i in inputs or (BEAM_INPUT,)
        for o in outputs or (BEAM_OUTPUT,)
    ]


def runs(cell_list: list[Cell]) -> list[Run]:
    grouped: dict[tuple, list[Cell]] = {}
    for cell in cell_list:
        if cell.beam_width == 1:
            key = (cell.scenario, cell.input_tokens, 1, None)
        else:  # beam search is not prefix-closed: one run per cell
            key = (cell.scenario, cell.input_tokens, cell.beam_width, cell.output_tokens)
        grouped.setdefault(key, []).append(cell)
    return [
        Run(scenario, inputs, max(c.output_tokens for c in group), width, tuple(sorted(group)))
        for (scenario, inputs, width, _), group in sorted(grouped.items())
    ]
