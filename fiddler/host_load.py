"""How much of the host's CPU something outside this process took while we measured.

Contract: ``HostLoad`` is a context manager; inside it the host's process time (user, nice and
system, from ``/proc/stat``) is counted beside this process's own (with its live descendants,
such as a llama-server it started, and its reaped children, from ``/proc/<pid>/stat``);
``summary()`` then gives, averaged over the window, ``other_busy_cores`` (cores kept busy by
every other process on the host) and ``steal_cores`` (cores the hypervisor gave to other
guests), plus ``seconds``. Interrupt time belongs to no process and is left out (our own
copies raise some of it). Where ``/proc`` is missing (not Linux), or the window is too short for
the counters' ticks, the summary is empty: contention is then unknown, never guessed as 0.

Why: the CPU expert kernels split every expert over all cores in static shares, so one core
taken by another process or by the hypervisor delays every expert by up to that core's share
(a calibration of 2026-12-01 read weights at 42 GB/s where the same machine measured 113 GB/s
ten minutes later). A latency or a calibration measured under such load says so.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from fiddler.timing import Clock

PROC = Path("/proc")
# /proc/stat's aggregate "cpu" line: user nice system idle iowait irq softirq steal guest
# guest_nice; the processes' time is user + nice + system (guest time is inside user and nice)
BUSY_FIELDS = (0, 1, 2)
STEAL_FIELD = 7
# /proc/<pid>/stat fields after the ")" that closes the command name (state is the first):
# ppid the 2nd; utime stime cutime cstime the 12th-15th (fields 14-17 of proc(5), from the pid)
PPID_FIELD = 1
PID_TIMES = slice(11, 15)
# counters advance in ticks (10 ms each, per core): over a window shorter than this many ticks
# the rounding alone could read as a busy core, so such a window reports nothing
MIN_WINDOW_TICKS = 100
USER_HZ = 100  # the tick rate Linux reports to user space everywhere, where sysconf cannot say


def _ticks_per_s() -> int:
    try:
        return os.sysconf("SC_CLK_TCK")
    except (AttributeError, ValueError, OSError):
        return USER_HZ


def _after_name(stat_text: str) -> list[str]:
    """The fields after the command name (which may hold spaces and parentheses)."""
    return stat_text[stat_text.rindex(")") + 2 :].split()


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


class ProcReader:
    """Reads the counters; a test gives its own ``read`` (path -> text, or None when absent)."""

    def __init__(self, read: Callable[[Path], str | None] | None = None, pid: int | None = None):
        self.read = read or _read_text
        self.pid = os.getpid() if pid is None else pid

    def host_ticks(self) -> tuple[int, int] | None:
        """(the processes' busy ticks, the hypervisor's steal ticks) over every core."""
        text = self.read(PROC / "stat")
        if not text:
            return None
        fields = [int(v) for v in text.splitlines()[0].split()[1:]]
        steal = fields[STEAL_FIELD] if len(fields) > STEAL_FIELD else 0
        return sum(fields[i] for i in BUSY_FIELDS), steal

    def own_ticks(self) -> int | None:
        """This process and its live descendants; reaped children come in through cutime/cstime.
        Every process's stat is read once, so a child reaped mid-scan is counted once."""
        stats: dict[int, tuple[int, int]] = {}  # pid -> (parent, ticks)
        for pid in _list_pids():
            text = self.read(PROC / str(pid) / "stat")
            if text:
                fields = _after_name(text)
                stats[pid] = int(fields[PPID_FIELD]), sum(int(v) for v in fields[PID_TIMES])
        if self.pid not in stats:
            return None
        tree, frontier = {self.pid}, [self.pid]
        while frontier:
            parent = frontier.pop()
            children = [pid for pid, (ppid, _) in stats.items() if ppid == parent and pid not in tree]
            tree.update(children)
            frontier.extend(children)
        return sum(stats[pid][1] for pid in tree)


Reading = tuple[float, tuple[int, int] | None, int | None]  # (seconds, host ticks, own ticks)


class HostLoad:
    """``with HostLoad() as load: ...`` then ``load.summary()`` (see the module's contract)."""

    def __init__(self, reader: ProcReader | None = None):
        self.reader = reader or ProcReader()
        self.clock = Clock("cpu").now
        self._start: Reading | None = None
        self._summary: dict[str, float] = {}

    def _reading(self) -> Reading:
        return self.clock(), self.reader.host_ticks(), self.reader.own_ticks()

    def __enter__(self) -> HostLoad:
        self._start = self._reading()
        return self

    def __exit__(self, *exc: object) -> None:
        self._summary = summarise(self._start, self._reading(), _ticks_per_s())

    def summary(self) -> dict[str, float]:
        return dict(self._summary)


def summarise(start: Reading, end: Reading, ticks_per_s: int) -> dict[str, float]:
    """Cores taken by others between two readings; empty when either lacks a counter or the
    window is too short to tell."""
    (t0, host0, own0), (t1, host1, own1) = start, end
    seconds = t1 - t0
    if None in (host0, host1, own0, own1) or seconds * ticks_per_s < MIN_WINDOW_TICKS:
        return {}
    busy = (host1[0] - host0[0]) / ticks_per_s
    own = (own1 - own0) / ticks_per_s
    return {
        "seconds": seconds,
        # ticks are coarse: our own time may round to a little more than the host's busy time
        "other_busy_cores": max(0.0, busy - own) / seconds,
        "steal_cores": (host1[1] - host0[1]) / ticks_per_s / seconds,
    }
