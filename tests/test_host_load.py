"""The host-load meter: other processes' and the hypervisor's cores, this process tree's excluded."""

import subprocess
import sys
import time

import pytest

from fiddler.host_load import PROC, HostLoad, ProcReader, summarise


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


@pytest.mark.skipif(not (PROC / "stat").exists(), reason="needs Linux's /proc")
def test_a_busy_stranger_is_seen_and_a_busy_thread_of_ours_is_not():
    # each against the host's load just before (a CI machine is not idle)
    with HostLoad() as before:
        time.sleep(1.0)
    spin = "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"
    # detached: its parent exits at once, so it is no descendant of this process
    subprocess.run(["bash", "-c", f"{sys.executable} -c '{spin}' &"], check=True)
    time.sleep(0.2)
    with HostLoad() as stranger:
        time.sleep(1.0)
    background = before.summary()["other_busy_cores"]
    assert stranger.summary()["other_busy_cores"] > background + 0.5
    time.sleep(0.5)  # the stranger has finished
    with HostLoad() as ours:
        t = time.time()
        while time.time() - t < 1.0:
            pass
    assert ours.summary()["other_busy_cores"] < background + 0.5
