"""The host signal: cyclic comparison, a host thread's set releasing a waiter, and on CUDA a
stream that waits on host memory until the host sets it."""

import threading
import time

import pytest
import torch

from fiddler.host_signal import VALUE_MASK, HostWaitSignal, host_signal, reached

WAIT_S = 0.05  # long enough that a waiter released early would be seen


def test_reached_is_cyclic():
    assert reached(5, 5) and reached(6, 5) and not reached(4, 5)
    assert reached(0, VALUE_MASK)  # one past the largest value wraps to 0
    assert not reached(VALUE_MASK, 0)


def test_a_host_wait_returns_only_once_set():
    signal = host_signal(torch.device("cpu"))
    assert isinstance(signal, HostWaitSignal)
    released = []

    def waiter():
        signal.wait_on(2)
        released.append(time.perf_counter())

    thread = threading.Thread(target=waiter)
    thread.start()
    signal.set(1)  # not yet
    time.sleep(WAIT_S)
    assert not released
    set_at = time.perf_counter()
    signal.set(2)
    thread.join(timeout=5)
    assert released and released[0] >= set_at
    signal.wait_on(1)  # already past: returns at once


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a stream memory wait needs CUDA")
def test_a_stream_waits_on_host_memory_until_set():
    device = torch.device("cuda")
    signal = host_signal(device)  # self-tested
    source = torch.arange(1024, dtype=torch.float32, pin_memory=True)
    signal.wait_on(1)
    copied = source.to(device, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    try:
        time.sleep(WAIT_S)
        held = not done.query()  # the stream waits for the host
    finally:
        signal.set(1)  # a failed assertion must not leave the stream held for later tests
    assert held
    done.synchronize()
    assert torch.equal(copied.cpu(), source)
