"""How much of the host's CPU something outside this process took while we measured.

Contract: ``HostLoad`` is a context manager; inside it the host's CPU time is counted from
``/proc/stat`` and this process's own (with its live descendants, such as a llama-server it
started, and its reaped children) from ``/proc/<pid>/stat``; ``summary()`` then gives, averaged
over the window, ``other_busy_cores`` (cores kept busy by every other process on the host) and
``steal_cores`` (cores the hypervisor gave to other guests), plus ``seconds``. Where ``/proc``
is missing (not Linux), or the window is too short for the counters' 10 ms ticks, the summary is
empty: contention is then unknown, never guessed as 0.

Why: the CPU expert kernels split every expert over all cores in static shares, so one core
taken by another process or by the hypervisor delays every expert by up to that core's share
(the seventh session's llama.cpp calibration read weights at 42 GB/s where the same machine
measured at 113 GB/s ten minutes later). A latency or a calibration measured under such load says so.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from fiddler.timing import Clock

PROC = Path("/proc")
# /proc/stat's aggregate "cpu" line: user nice system idle iowait irq softirq steal guest guest_nice;
# guest time is already inside user and nice
BUSY_FIELDS = (0, 1, 2, 5, 6)
STEAL_FIELD = 7
# /proc/<pid>/stat fields after the ")" that closes the command name: utime stime cutime cstime
# are the 12th-15th (fields 14-17 of proc(5), counted from the pid)
PID_TIMES = slice(11, 15)
PPID_FIELD = 1
# counters advance in ticks (10 ms each, per core): over a window shorter than this many ticks
# the rounding alone could read as a busy core, so such a window reports nothing
MIN_WINDOW_TICKS = 100


def _ticks_per_s() -> int:
    try:
        return os.sysconf("SC_CLK_TCK")
    except (AttributeError, ValueError, OSError):
        return 100


def _after_name(stat_text: str) -> list[str]:
    """The fields after the command name (which may hold spaces and parentheses)."""
    return stat_text[stat_text.rindex(")") + 2 :].split()


class ProcReader:
    """Reads the counters; a test gives its own ``read`` (path -> text, or None when absent)."""

    def __init__(self, read: Callable[[Path], str | None] | None = None, pid: int | None = None):
        self.read = read or _read_text
        self.pid = os.getpid() if pid is None else pid

    def host_ticks(self) -> tuple[int, int] | None:
        text = self.read(PROC / "stat")
        if not text:
            return None
        fields = [int(v) for v in text.splitlines()[0].split()[1:]]
        steal = fields[STEAL_FIELD] if len(fields) > STEAL_FIELD else 0
        return sum(fields[i] for i in BUSY_FIELDS if i < len(fields)), steal

    def own_ticks(self) -> int | None:
        """This process and its live descendants; reaped children come in through cutime/cstime."""
        parents = self._parents()
        tree, frontier = {self.pid}, [self.pid]
        while frontier:
            parent = frontier.pop()
            for pid, ppid in parents.items():
                if ppid == parent and pid not in tree:
                    tree.add(pid)
                    frontier.append(pid)
        total = None
        for pid in tree:
            text = self.read(PROC / str(pid) / "stat")
            if text:  # a descendant that exited in between is counted by its parent's cutime
                total = (total or 0) + sum(int(v) for v in _after_name(text)[PID_TIMES])
        return total

    def _parents(self) -> dict[int, int]:
        parents = {}
        for entry in _list_pids():
            text = self.read(PROC / str(entry) / "stat")
            if text:
                parents[entry] = int(_after_name(text)[PPID_FIELD])
        return parents


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _list_pids() -> list[int]:
    try:
        return [int(p.name) for p in PROC.iterdir() if p.name.isdigit()]
    except OSError:
        return []


class HostLoad:
    def __init__(self, reader: ProcReader | None = None):
        self.reader = reader or ProcReader()
        self.clock = Clock("cpu").now
        self._start: tuple[float, tuple[int, int] | None, int | None] | None = None
        self._summary: dict[str, float] = {}

    def __enter__(self) -> HostLoad:
        self._start = (self.clock(), self.reader.host_ticks(), self.reader.own_ticks())
        return self

    def __exit__(self, *exc) -> None:
        end = (self.clock(), self.reader.host_ticks(), self.reader.own_ticks())
        self._summary = summarise(self._start, end, _ticks_per_s())

    def summary(self) -> dict[str, float]:
        return dict(self._summary)


def summarise(start, end, ticks_per_s: int) -> dict[str, float]:
    (t0, host0, own0), (t1, host1, own1) = start, end
    seconds = t1 - t0
    if host0 is None or host1 is None or own0 is None or own1 is None or seconds * ticks_per_s < MIN_WINDOW_TICKS:
        return {}
    busy = (host1[0] - host0[0]) / ticks_per_s
    own = (own1 - own0) / ticks_per_s
    return {
        "seconds": seconds,
        # ticks are coarse: our own time may round to a little more than the host's busy time
        "other_busy_cores": max(0.0, busy - own) / seconds,
        "steal_cores": (host1[1] - host0[1]) / ticks_per_s / seconds,
    }
