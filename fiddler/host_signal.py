"""A counter in host memory that an accelerator stream can wait on, set by a host thread.

Contract: ``host_signal(device)`` returns a ``HostSignal``. ``wait_on(value)`` makes the work
queued after it on the device's current stream wait until the counter has reached ``value``;
``set(value)`` is called by the host thread that produced what that work reads, once it has
written it. Values grow by one per use (compared cyclically, so they may wrap).

On CUDA the wait is a stream memory operation of the driver (``cuStreamWaitValue32`` on a word
of page-locked memory, reached through ctypes; no compiled code): the calling thread returns at
once and goes on queueing work behind the wait. Why: Fiddler's main thread otherwise waits for
the CPU worker before it can queue the CPU results' way up and everything after, and that
queueing (the layer's tail, the next layer's attention) then lies on the critical path, ~0.4 ms
a decode layer on the GPU host (results/orchestration-h200/, run 10). ``host_signal`` raises
``ValueError`` saying why when the driver lacks the operation, the host is not x86 (the rows and
the counter are plain stores, whose order only x86 keeps), or a self-test on the current stream
finds it not holding until ``set`` or not passing after. Each CUDA signal's word stays allocated
until the process ends (a queued wait may read it after its owner closed). On the CPU there is
no stream: ``wait_on`` blocks the caller until the value is set (the CPU tests run the same
executor code).

Deadlock rule for callers: everything the setting thread waits for must be queued before the
wait (stream order), and the setter must set its value even when its work fails.
"""

from __future__ import annotations

import ctypes
import platform
import threading
import time
from typing import Protocol

import torch

from fiddler.streams import record
from fiddler.timing import Clock

VALUE_BITS = 32
VALUE_MASK = (1 << VALUE_BITS) - 1
CU_STREAM_WAIT_VALUE_GEQ = 0  # (int32)(*addr - value) >= 0: cyclic, so the counter may wrap
CUDA_SUCCESS = 0
SELF_TEST_TIMEOUT_S = 2.0  # a working stream wait passes in microseconds
SELF_TEST_POLL_S = 1e-3
SELF_TEST_HOLD_S = 5e-3  # how long a held stream must stay held (a working one: forever)
STORE_ORDERED_MACHINES = ("x86_64", "AMD64")  # hosts whose plain stores become visible in order
_KEPT_WORDS: list[torch.Tensor] = []  # every signal's word, alive to the process's end (see StreamWaitSignal)


def reached(current: int, value: int) -> bool:
    """The driver's cyclic comparison: ``current`` is at or past ``value`` (32-bit counters)."""
    return ((current - value) & VALUE_MASK) < (1 << (VALUE_BITS - 1))


class HostSignal(Protocol):
    def wait_on(self, value: int) -> None: ...

    def set(self, value: int) -> None: ...


class HostWaitSignal:
    """Without streams (the CPU): ``wait_on`` blocks the calling thread until ``set``."""

    def __init__(self) -> None:
        self._value = 0
        self._changed = threading.Condition()

    def wait_on(self, value: int) -> None:
        with self._changed:
            self._changed.wait_for(lambda: reached(self._value, value & VALUE_MASK))

    def set(self, value: int) -> None:
        with self._changed:
            self._value = value & VALUE_MASK
            self._changed.notify_all()


class _Driver:
    """The two driver entry points the stream wait needs, from libcuda through ctypes."""

    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as err:
            raise ValueError(f"the CUDA driver library could not be loaded ({err})") from err
        self.wait_value = self._entry(lib, "cuStreamWaitValue32")
        self.wait_value.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        self.device_pointer = self._entry(lib, "cuMemHostGetDevicePointer")
        self.device_pointer.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint]
        for entry in (self.wait_value, self.device_pointer):
            entry.restype = ctypes.c_int

    @staticmethod
    def _entry(lib: ctypes.CDLL, name: str):
        # CUDA 12's headers map the names to their _v2 versions; older drivers export only the first
        for symbol in (f"{name}_v2", name):
            entry = getattr(lib, symbol, None)
            if entry is not None:
                return entry
        raise ValueError(f"the CUDA driver lacks {name}")

    @staticmethod
    def check(code: int, what: str) -> None:
        if code != CUDA_SUCCESS:
            raise ValueError(f"{what} failed with CUDA driver error {code}")


class StreamWaitSignal:
    """On CUDA: the stream waits on a page-locked word that ``set`` writes from the host. The
    word lives as long as the process (``close`` may not free it: a queued wait may still read
    it), one per signal, a few bytes."""

    def __init__(self, device: torch.device):
        if platform.machine() not in STORE_ORDERED_MACHINES:
            # the worker writes its rows, then set() the word, with plain stores: x86 keeps them in order
            raise ValueError(
                f"the stream CPU mode relies on x86's store order; this host is {platform.machine()}: "
                "use cpu_mode thread"
            )
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self._driver = _Driver()
        self._word = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        _KEPT_WORDS.append(self._word)
        self._host_word = ctypes.c_uint32.from_address(self._word.data_ptr())
        self._device_word = ctypes.c_uint64()
        with torch.cuda.device(self.index):  # sets the device: its primary context is current here
            self._driver.check(
                self._driver.device_pointer(ctypes.byref(self._device_word), self._word.data_ptr(), 0),
                "cuMemHostGetDevicePointer",
            )

    def wait_on(self, value: int) -> None:
        # the current stream is the legacy default one (handle 0) unless a stream is set: the
        # driver puts handle 0 in the calling thread's current context, which must be the device's
        with torch.cuda.device(self.index):
            stream = torch.cuda.current_stream(self.index).cuda_stream
            word = self._device_word.value
            code = self._driver.wait_value(stream, word, value & VALUE_MASK, CU_STREAM_WAIT_VALUE_GEQ)
        self._driver.check(code, "cuStreamWaitValue32")

    def set(self, value: int) -> None:
        # one aligned 32-bit store, after the caller's stores of what the waiting work reads
        # (x86 keeps stores in order; the work after the wait reads host memory afresh)
        self._host_word.value = value & VALUE_MASK

    def self_test(self) -> None:
        """On the stream real use waits on (the current one): the stream must hold until
        ``set`` and pass after it; ValueError otherwise. The word ends at 0."""
        clock = Clock("cpu")  # the host's clock: reading it must not wait for the device
        self.wait_on(1)
        passed = record(torch.device("cuda", self.index))
        try:
            time.sleep(SELF_TEST_HOLD_S)
            if passed.query():
                raise ValueError("a stream told to wait on host memory did not wait (the driver ignored the wait)")
        finally:
            self.set(1)  # the stream must not stay held, whatever happened
        deadline = clock.now() + SELF_TEST_TIMEOUT_S
        while not passed.query():
            if clock.now() > deadline:
                raise ValueError(f"a stream waiting on host memory did not pass within {SELF_TEST_TIMEOUT_S} s")
            time.sleep(SELF_TEST_POLL_S)
        self.set(0)


def host_signal(device: torch.device) -> HostSignal:
    """The signal for ``device``: a stream wait on CUDA (self-tested), a host wait elsewhere."""
    if device.type != "cuda":
        return HostWaitSignal()
    signal = StreamWaitSignal(device)
    signal.self_test()
    return signal
