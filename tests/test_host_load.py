"""The host-load meter: other processes' and the hypervisor's cores, this process tree's excluded."""

import subprocess
import sys
import time

import pytest

from fiddler.host_load import PROC, HostLoad, ProcReader, _ticks_per_s, summarise


def _stat_line(user: int, nice: int, system: int, idle: int, iowait: int, irq: int, softirq: int, steal: int) -> str:
    return f"cpu  {user} {nice} {system} {idle} {iowait} {irq} {softirq} {steal} 0 0\ncpu0 1 2 3 4\n"


def _pid_stat(pid: int, ppid: int, utime: int, stime: int, cutime: int, cstime: int, noise: int) -> str:
    """A /proc/<pid>/stat line whose other fields (minflt ... cmajflt, priority, nice) hold
    ``noise``, so that a wrong field index reads a wrong number."""
    before = " ".join(str(noise + i) for i in range(9))  # pgrp session tty tpgid flags minflt cminflt majflt cmajflt
    after = " ".join(str(noise + 10 + i) for i in range(4))  # priority nice num_threads itrealvalue
    return f"{pid} (py thon (x)) S {ppid} {before} {utime} {stime} {cutime} {cstime} {after}"


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
        "stat": _stat_line(user=1000, nice=100, system=500, idle=9000, iowait=70, irq=30, softirq=20, steal=5),
        "10/stat": _pid_stat(10, 1, utime=100, stime=10, cutime=1, cstime=2, noise=1000),
        "11/stat": _pid_stat(11, 10, utime=50, stime=5, cutime=0, cstime=0, noise=2000),  # a child (llama-server): ours
        "99/stat": _pid_stat(99, 1, utime=0, stime=0, cutime=0, cstime=0, noise=3000),  # a stranger
    }
    # over 2 s: ours 120 + 40 + 20 + 20 ticks, the child's 60 + 40, the stranger's 400 + 90, which
    # the host counts as user 490, nice 100, system 200; idle, iowait and interrupts advance too
    # but are no process's time
    after = {
        "stat": _stat_line(user=1490, nice=200, system=700, idle=9500, iowait=170, irq=90, softirq=60, steal=55),
        "10/stat": _pid_stat(10, 1, utime=220, stime=50, cutime=21, cstime=22, noise=1500),
        "11/stat": _pid_stat(11, 10, utime=110, stime=45, cutime=0, cstime=0, noise=2500),
        "99/stat": _pid_stat(99, 1, utime=400, stime=90, cutime=0, cstime=0, noise=3500),
    }
    load = _meter(before, after)
    assert load["seconds"] == 2.0
    # host busy 490 + 100 + 200 = 790 ticks, ours 200 + 100 = 300: others 490 ticks = 2.45 cores over 2 s
    assert load["other_busy_cores"] == pytest.approx(490 / 100 / 2)
    assert load["steal_cores"] == pytest.approx(50 / 100 / 2)


def test_without_proc_or_within_a_few_ticks_the_load_is_unknown_not_zero():
    reader = ProcReader(read=lambda path: None, pid=10)
    with HostLoad(reader) as load:
        pass
    assert load.summary() == {}
    reading = (0.0, (100, 0), 10)
    assert summarise(reading, (0.5, (150, 0), 10), ticks_per_s=100) == {}  # 50 ticks: too short to tell


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@pytest.mark.skipif(not (PROC / "stat").exists(), reason="needs Linux's /proc")
def test_on_real_proc_a_child_is_ours_and_anyone_else_is_other():
    # (assertions that other load on the machine can only strengthen, never break: the child
    # spins until it has used 1.2 s of CPU, however long a busy machine makes that take)
    spin_cpu = "import time\nwhile time.process_time() < 1.2: pass"
    child = subprocess.Popen([sys.executable, "-c", spin_cpu])
    reader = ProcReader()
    before = reader.own_ticks()
    child.wait()
    assert (reader.own_ticks() - before) / _ticks_per_s() > 0.8  # most of the child's second counts as ours
    # seen from another process (a sleeping one), this process's spinning is someone else's
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        with HostLoad(ProcReader(pid=sleeper.pid)) as load:
            _spin(1.2)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert load.summary()["other_busy_cores"] > 0.5
