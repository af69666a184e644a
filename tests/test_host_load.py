"""The host-load meter: other processes' and the hypervisor's cores, this process tree's excluded."""

import subprocess
import sys
import time

import pytest

from fiddler.host_load import PROC, HostLoad, ProcReader, _ticks_per_s, summarise


def _stat_line(busy: int, steal: int) -> str:
    # user nice system idle iowait irq softirq steal guest guest_nice
    return f"cpu  {busy} 0 0 5000 0 0 0 {steal} 0 0\ncpu0 1 2 3 4\n"


def _pid_stat(pid: int, ppid: int, ticks: int, name: str = "py thon (x)") -> str:
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime cutime cstime
    return f"{pid} ({name}) S {ppid} 0 0 0 0 0 0 0 0 0 {ticks} 0 0 0 20 0"


def _meter(before: dict[str, str], after: dict[str, str]) -> dict[str, float]:
    """The meter's two readings, 2 s apart, of a /proc that shows ``before`` then ``after``."""
    page = before
    reader = ProcReader(read=lambda path: page.get(str(path.relative_to(PROC))), pid=10)
    start = (0.0, reader.host_ticks(), reader.own_ticks())
    page = after
    end = (2.0, reader.host_ticks(), reader.own_ticks())
    return summarise(start, end, ticks_per_s=100)


def test_other_processes_count_and_this_process_tree_does_not(monkeypatch):
    monkeypatch.setattr("fiddler.host_load._list_pids", lambda: [10, 11, 99])
    before = {
        "stat": _stat_line(busy=1000, steal=0),
        "10/stat": _pid_stat(10, 1, 100),
        "11/stat": _pid_stat(11, 10, 50),  # a child (llama-server): ours
        "99/stat": _pid_stat(99, 1, 0),  # a stranger
    }
    after = {
        "stat": _stat_line(busy=1000 + 200 + 100 + 300, steal=50),  # ours 200 + child 100, stranger 300
        "10/stat": _pid_stat(10, 1, 300),
        "11/stat": _pid_stat(11, 10, 150),
        "99/stat": _pid_stat(99, 1, 300),
    }
    load = _meter(before, after)
    assert load["seconds"] == 2.0
    assert load["other_busy_cores"] == pytest.approx(300 / 100 / 2)  # 1.5 cores over 2 s
    assert load["steal_cores"] == pytest.approx(50 / 100 / 2)


def test_without_proc_the_load_is_unknown_not_zero():
    reader = ProcReader(read=lambda path: None, pid=10)
    with HostLoad(reader) as load:
        pass
    assert load.summary() == {}


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@pytest.mark.skipif(not (PROC / "stat").exists(), reason="needs Linux's /proc")
def test_on_real_proc_a_child_is_ours_and_anyone_else_is_other():
    # (assertions that other load on the machine can only strengthen, never break)
    child = subprocess.Popen(
        [sys.executable, "-c", "import time\nend = time.monotonic() + 1.2\nwhile time.monotonic() < end: pass"]
    )
    reader = ProcReader()
    before = reader.own_ticks()
    child.wait()
    assert (reader.own_ticks() - before) / _ticks_per_s() > 0.8  # the child's second counts as ours
    # seen from another process (a sleeping one), this process's spinning is someone else's
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        with HostLoad(ProcReader(pid=sleeper.pid)) as load:
            _spin(1.2)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert load.summary()["other_busy_cores"] > 0.5
