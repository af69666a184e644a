"""Fiddler's MoE executor: GPU-resident experts on the accelerator, missing experts on the CPU
(activations cross) or copied into staging buffers, as each layer's plan says.

Contract: ``FiddlerExecutor`` is an ``ExpertExecutor``. Per layer it reads the routing on the
host (one synchronisation of the compute stream; after that read, when the executor may use
the CPU at all, the layer's hidden states go down into host memory on a stream of their own,
which nothing but the CPU path waits for), asks
``fiddler.planner.plan_layer`` for a plan (cached by
routing pattern), then runs the plan with the paths overlapping: first the CPU rows go to a
worker thread, which gathers them on the host (a decode step's few rows: the main thread, before
the hand-off) and computes them (the CPU path usually ends a
layer, so it starts before anything else is queued); then copies are queued on a side stream
into reusable staging slots (a slot is reused only after the accelerator has finished with
it) and the accelerator runs the resident experts and then each copied expert once its copy
has landed; the CPU results come back in one transfer. (Why this order: the GPU host's layer
timelines, results/orchestration-h200/threads-ab/, showed hybrid's CPU work beginning
0.7-1.1 ms into a ~6 ms decode layer, after the copies had been queued and the CPU rows
gathered on the accelerator and sent down. The planner charges the CPU path the transfer of
the whole pass's hidden states: tens of microseconds in decode, milliseconds in a long prefill,
where it runs beside the copies, in the other direction.) ``cpu_mode`` says how the CPU rows and
the main thread meet (``CPU_MODES``): ``thread`` hands them to the worker and the main thread
waits for it on the host before it queues their way up and the rest of the layer; ``inline``
has the main thread compute them itself once it has queued all of the accelerator's work
(which then runs on its own): no thread hand-off, a later start; ``stream`` hands them to the
worker, and the main thread queues their way up behind a wait of the accelerator's stream on a
``fiddler.host_signal`` counter the worker sets when they are written, then goes on (the layer's
tail and the next layer's attention are queued while the CPU computes; the main thread then
sleeps on the job, not spinning in the next routing read's wait, and takes its measurements in
there, or at the model's last layer before returning, where the caller's read of the token would
spin, or before a timed layer's closing synchronisation, which would spin likewise). An
expert the plan divides runs its first blocks on the CPU and the rest after a copy of only
those blocks; the two partial outputs are added. Every expert is kept in the split layout
of ``fiddler.expert_layout``. Outputs are identical, up to summation order, to running every
expert in one place. The CPU latencies the planner uses are corrected during the run by
what the CPU jobs measure: ``cpu_factor`` scales the CPU curve from jobs that ran with no
copies beside them, ``cpu_slowdown`` replaces the calibrated slowdown beside copies from jobs
that had copies (calibration runs alone and briefly; a run has the GPU, its own threads and
copies beside it); a job beside copies also bounds the curve's scale from above (copies never
speed the CPU up), so a curve measured slow is lowered by jobs that beat it. A ``cpu_factor``
above 1 that leaves a layer with no CPU work relaxes toward the calibration (its excess halves
over one pass through the model's layers): a plan that no longer uses the CPU measures nothing
that could lower it, and a few slow jobs would otherwise keep the CPU path shut for the whole
run. With ``adapt_paths`` (on an accelerator) the executor also learns how late each path ends
against the plan's timeline, from the routing read: the CPU job's end on the host clock, the
last copy's landing from events on the accelerator, read one layer later when they have
happened (no synchronisation), in every decode or beam step's layer (a pass of at most
``MAIN_THREAD_GATHER_ROWS`` routed rows) where both paths ran. The two offsets
(``cpu_offset``, ``copy_offset``) go into the planning model, so the division of a layer's
missing experts between the paths follows where they actually end: the calibration's model
leaves out the CPU job's hand-off and start and the copies' queueing, and the timed decode layers
on the GPU host ended with the copies 0.45-0.73 ms after the CPU (results/orchestration-h200/).
(The host's origin is its clock once it woke from the routing read's synchronisation, the
device's that read's event: the CPU's end is measured early by the wake-up's microseconds.
Timed layers, which synchronise the device first, are not measured; switching ``adapt_paths``
or ``cpu_mode``, or another calibration, starts the offsets again from zero.)

With ``layer_timing`` on, each layer is timed between two device synchronisations and
``layer_log`` records its plan, predicted and measured time and a timeline in ms from the
layer's start: on the host, when the routing was known, the CPU job submitted, taken up by
the worker, its hidden states in host memory (``cpu_inputs``), begun (its rows gathered) and
ended, the accelerator's work issued and
the main thread's wait for the CPU over; on the accelerator (from events, no extra
synchronisation), when the copy stream reached the layer's copies, when they landed and when
its own work was done.

``stats()`` counts what ran where and what crossed PCIe: ``h2d_bytes`` = copied expert
weights + CPU results, ``d2h_bytes`` = hidden states sent down with the routing (every layer's,
unless the executor never uses the CPU) + the routing ids read on the host; ``rows_*`` count
routed (token, expert) pairs per path (a divided expert's rows count as ``rows_split``);
``cpu_jobs``, ``cpu_start_s``, ``cpu_compute_s`` and ``cpu_wait_s`` time the CPU path on the
host clock in every run (no synchronisation): how long after the routing was known it began
computing, how long it computed, how long the main thread then waited for it (``stream``: how
long it slept on the job at the next layer, after queueing the work between).

Shape legend: N tokens, K experts per token, D hidden, R = N * K routed (token, slot) rows.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from fiddler.config import ModelConfig
from fiddler.cost_model import SHARE_CURVE_TOKENS, LatencyModel
from fiddler.cpu_experts import CpuExpertKernel, set_cpu_threads_with
from fiddler.expert_layout import split_ffn, split_shapes
from fiddler.host_signal import HostSignal, host_signal
from fiddler.loading import HostWeights
from fiddler.moe import Routing, combine
from fiddler.placement import Placement
from fiddler.planner import COPY_EXPERTS, LayerPlan, plan_layer
from fiddler.streams import elapsed_ms, host_wait, new_stream, on_stream, record, wait
from fiddler.timing import Clock, synchronize

PLAN_CACHE_SIZE = 4096  # distinct routing patterns remembered; decode repeats a few
MODEL_CACHE_SIZE = 64  # latency models kept, one per step of the in-run corrections
# In-run correction of the CPU latencies: exponential averages of measured / predicted CPU
# compute, applied in steps so that cached plans stay valid between steps.
CPU_FACTOR_SMOOTHING = 0.2
CPU_FACTOR_STEP = 0.05
CPU_FACTOR_BOUNDS = (0.25, 4.0)
CPU_SLOWDOWN_BOUNDS = (1.0, 4.0)  # copies never speed the CPU up
# the paths' offsets are applied in steps of this many seconds (cached plans stay valid between
# steps): a tenth of a millisecond, a fiftieth of a decode layer's ~5 ms
PATH_OFFSET_STEP_S = 1e-4
# the offset a plan uses moves to another step only once the learned average is this share of a
# step away from it: noise around the edge between two steps would otherwise switch between them,
# and each switch plans the layers again (~0.1 ms a plan on the decode's critical path)
PATH_OFFSET_HYSTERESIS = 0.75
# the counters that time the CPU path on the host clock (ExpertCounters, stats())
CPU_PATH_COUNTERS = ("cpu_jobs", "cpu_start_s", "cpu_compute_s", "cpu_wait_s")
# how the CPU rows and the main thread meet (the module docstring): the worker with the main
# thread waiting on the host, the main thread computing them, the worker with the stream waiting
THREAD, INLINE, STREAM = "thread", "inline", "stream"
CPU_MODES = (THREAD, INLINE, STREAM)
CPU_ROWS_ON = {THREAD: "worker thread", INLINE: "main thread", STREAM: "worker thread, stream waits"}
# A CPU job of at most this many rows (a decode step's, beams included) has its rows gathered by
# the main thread before the hand-off: a few microseconds there, where the worker, gathering them
# while the main thread queues the accelerator's work, took 0.13-0.15 ms between taking the job up
# and computing (results/orchestration-h200/, run 13). Larger jobs (prefill) gather on the worker,
# so the main thread's queueing of copies does not wait for a long gather.
MAIN_THREAD_GATHER_ROWS = 16
HOST_CLOCK = Clock("cpu")  # timeline and counter readings that must not synchronise the device


def _mark(marks: dict[str, float] | None, name: str) -> None:
    """A timed layer's timeline mark on the host clock; ``marks`` None: the layer is not timed."""
    if marks is not None:
        marks[name] = HOST_CLOCK.now()


def _stepped(value: float, size: float) -> float:
    """``value`` on the grid of ``size`` (an in-run correction as plans use it)."""
    return round(round(value / size) * size, 9)


def _smoothed(current: float, measured: float, bounds: tuple[float, float]) -> float:
    """One step of the in-run corrections' exponential average, kept within ``bounds``."""
    value = (1 - CPU_FACTOR_SMOOTHING) * current + CPU_FACTOR_SMOOTHING * measured
    return min(max(value, bounds[0]), bounds[1])


@dataclasses.dataclass(frozen=True)
class _CpuJob:
    """When the CPU worker took the job up, had the layer's hidden states in host memory,
    began computing (its rows gathered, the previous results gone up) and ended (host clock,
    seconds)."""

    picked: float
    inputs: float
    begin: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.begin


class _InlineJob:
    """A CPU job the main thread runs itself, when its result is first asked for."""

    def __init__(self, work: Callable[[], _CpuJob]):
        self._work, self._done = work, None

    def result(self) -> _CpuJob:
        if self._done is None:
            self._done = self._work()
        return self._done


@dataclasses.dataclass(frozen=True)
class _CpuJobOut:
    """A CPU job handed out, with what taking its measurements in needs."""

    job: Future | _InlineJob
    plan: LayerPlan
    tokens: dict[int, int]
    routed_at: float


@dataclasses.dataclass(frozen=True)
class _PathSample:
    """One layer's paths, to be measured once its events have happened (``adapt_paths``): the
    routing read's event and the host clock just after it, the last copy's landing, the CPU
    job, the plan and the offsets it was made with."""

    routed: torch.cuda.Event
    synced_at: float
    landed: torch.cuda.Event
    job: Future | _InlineJob
    plan: LayerPlan
    offsets: tuple[float, float]


@dataclasses.dataclass
class _Slot:
    """One staging buffer on the accelerator for a copied expert (or its copied blocks)."""

    w13b: torch.Tensor
    w2b: torch.Tensor
    free: torch.cuda.Event | None = None  # the accelerator's last use of this slot


@dataclasses.dataclass
class ExpertCounters:
    """Running totals of what ran where and what crossed PCIe (see the module's ``stats()``)."""

    layers: int = 0
    experts_gpu: int = 0
    experts_cpu: int = 0
    experts_copied: int = 0
    experts_split: int = 0
    rows_gpu: int = 0
    rows_cpu: int = 0
    rows_copied: int = 0
    rows_split: int = 0
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    predicted_s: float = 0.0
    measured_s: float = 0.0  # only with layer timing on
    # the CPU path on the host clock, always (no device synchronisation): layers it ran in, and
    # over them the time from the routing known on the host to the CPU computing, its compute,
    # and the main thread's wait for it after queueing the accelerator's work
    cpu_jobs: int = 0
    cpu_start_s: float = 0.0
    cpu_compute_s: float = 0.0
    cpu_wait_s: float = 0.0

    def to_json(self) -> dict[str, object]:
        rows = self.rows_gpu + self.rows_cpu + self.rows_copied + self.rows_split
        return dataclasses.asdict(self) | {"gpu_hit_rate": self.rows_gpu / rows if rows else None}


class FiddlerExecutor:
    """The executor of the module docstring; ``policy`` and ``cpu_mode`` may be switched
    between generations."""

    capturable = False

    def __init__(
        self,
        config: ModelConfig,
        device: torch.device,
        host: HostWeights,
        resident: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]],
        placement: Placement,
        latency: LatencyModel,
        policy: str,
        cpu_kernel: CpuExpertKernel,
        staging_slots: int = 2,
        layer_timing: bool = False,
        adapt_cpu: bool = True,
        cpu_mode: str = THREAD,
        adapt_paths: bool = False,
    ):
        self.config, self.device, self.host = config, device, host
        self.resident, self.placement, self.latency = resident, placement, latency
        self.policy, self.cpu_kernel = policy, cpu_kernel
        self.blocks = host.blocks
        self.block = config.intermediate_size // host.blocks  # rows of w13b per half-block
        self.resident_by_layer = [frozenset(placement.resident_in_layer(layer)) for layer in range(config.num_layers)]
        self.dtype = host.experts[0][0][0].dtype
        w13_shape, w2_shape = split_shapes(config)
        self.slots = [
            _Slot(
                torch.empty(w13_shape, device=device, dtype=self.dtype),
                torch.empty(w2_shape, device=device, dtype=self.dtype),
            )
            for _ in range(staging_slots)
        ]
        self._next_slot = 0
        self.expert_bytes = sum(t.numel() * t.element_size() for t in (self.slots[0].w13b, self.slots[0].w2b))
        self.copy_stream = new_stream(device)
        # hidden states go down on a stream of their own: the routing read does not wait for
        # them, and the device->host direction is otherwise idle while experts are copied up
        self.down_stream = new_stream(device)
        self.cpu_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fiddler-cpu")
        self._host_hidden = self._host_out = torch.empty(0)
        self._host_routing = torch.empty(0, dtype=torch.long)  # the routing ids read each layer
        self._host_out_free: torch.cuda.Event | None = None  # last transfer out of _host_out
        self._plans: dict[tuple, LayerPlan] = {}
        self.adapt_cpu = adapt_cpu
        self.cpu_factor = 1.0
        # the excess of cpu_factor over 1 halves over config.num_layers layers without CPU work
        self._cpu_factor_keep = 0.5 ** (1.0 / config.num_layers)
        self.cpu_slowdown = latency.cpu_slowdown
        self.cpu_offset = self.copy_offset = 0.0  # learned averages
        self._applied_offsets = (0.0, 0.0)  # the steps plans use
        self._path_sample: _PathSample | None = None
        self._adapt_paths = adapt_paths
        self._models: dict[tuple[float, ...], LatencyModel] = {}
        self.layer_timing = layer_timing
        self._cpu_mode = THREAD
        self._signal: HostSignal | None = None  # made when the stream mode is first asked for
        self._signal_value = 0  # the value the last CPU job sets (stream mode)
        self._pending: _CpuJobOut | None = None  # a stream-mode job not yet taken in
        self.cpu_mode = cpu_mode  # checked; the stream mode's signal made and self-tested
        self.layer_log: list[dict[str, object]] = []
        self.counters = ExpertCounters()

    @property
    def adapt_paths(self) -> bool:
        """Whether the executor learns where its paths end (module docstring); switched between
        generations, the offsets start again from zero."""
        return self._adapt_paths

    @adapt_paths.setter
    def adapt_paths(self, on: bool) -> None:
        self._adapt_paths = on
        self._reset_path_offsets()

    def _reset_path_offsets(self) -> None:
        self.cpu_offset = self.copy_offset = 0.0
        self._applied_offsets = (0.0, 0.0)
        self._path_sample = None

    @property
    def cpu_mode(self) -> str:
        """How the CPU rows and the main thread meet, one of ``CPU_MODES`` (module docstring)."""
        return self._cpu_mode

    @cpu_mode.setter
    def cpu_mode(self, mode: str) -> None:
        if mode not in CPU_MODES:
            raise ValueError(f"cpu_mode must be one of {', '.join(CPU_MODES)}; got {mode!r}")
        self._take_in_pending()
        if mode == STREAM and self._signal is None:
            self._signal = host_signal(self.device)  # ValueError, saying why, where it cannot work
        self._cpu_mode = mode
        self._reset_path_offsets()  # where the CPU path ends depends on how it meets the main thread

    # ---- the executor interface ---------------------------------------------------------

    @property
    def uses_cpu(self) -> bool:
        """Whether any layer may compute on the CPU under the current policy (else the hidden
        states stay on the device). A property: experiments switch ``policy`` on one executor."""
        every_expert = self.config.num_layers * self.config.num_experts
        return self.policy != COPY_EXPERTS and self.placement.num_resident < every_expert

    @property
    def planning_corrections(self) -> tuple[float, float, float, float]:
        """The in-run corrections in steps: (CPU curve scale, CPU slowdown beside copies, CPU
        path's offset, copy path's offset; the offsets zero unless ``adapt_paths``)."""

        factor, slowdown = _stepped(self.cpu_factor, CPU_FACTOR_STEP), _stepped(self.cpu_slowdown, CPU_FACTOR_STEP)
        return (factor, slowdown, *self._applied_offsets) if self._adapt_paths else (factor, slowdown, 0.0, 0.0)

    def planning_model(self, corrections: tuple[float, float, float, float] | None = None) -> LatencyModel:
        corrections = self.planning_corrections if corrections is None else corrections
        model = self._models.get(corrections)
        if model is None:
            if len(self._models) >= MODEL_CACHE_SIZE:  # each holds its interpolations: bounded
                self._models.clear()
            factor, slowdown, cpu_offset, copy_offset = corrections
            model = self.latency.with_cpu_factor(factor, slowdown).with_path_offsets(cpu_offset, copy_offset)
            self._models[corrections] = model
        return model

    def use_cpu_threads(self, threads: int | None) -> int:
        """Run the CPU kernels with ``threads`` threads from now on (between generations), on
        the main thread and the CPU worker (``set_cpu_threads_with``); returns the count."""
        return set_cpu_threads_with(self.cpu_worker, threads)

    def use_calibration(self, latency: LatencyModel, cpu_kernel: CpuExpertKernel) -> None:
        """Plan with another calibration and compute with the kernel it chose (between
        generations; e.g. one measured under another CPU thread count); the in-run
        corrections start again from it."""
        self._take_in_pending()
        self.latency, self.cpu_kernel = latency, cpu_kernel
        self._models.clear()
        self._plans.clear()
        self.cpu_factor, self.cpu_slowdown = 1.0, latency.cpu_slowdown
        self._reset_path_offsets()

    def plan(
        self, layer: int, tokens: dict[int, int], corrections: tuple[float, float, float, float] | None = None
    ) -> LayerPlan:
        """The layer's plan for ``tokens`` under ``corrections`` (default: the current
        ``planning_corrections``), cached."""
        corrections = self.planning_corrections if corrections is None else corrections
        resident = self.resident_by_layer[layer]
        key = (resident, tuple(sorted(tokens.items())), self.policy, corrections)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= PLAN_CACHE_SIZE:
                self._plans.clear()
            rows_down = sum(tokens.values()) // self.config.num_experts_per_token if self.uses_cpu else None
            plan = plan_layer(
                tokens, resident, self.policy, self.planning_model(corrections), len(self.slots), self.blocks, rows_down
            )
            self._plans[key] = plan
        return plan

    def _learn_cpu_factor(self, plan: LayerPlan, tokens: dict[int, int], seconds: float) -> None:
        """Fold one measured CPU job into the in-run corrections. A job with no copies beside it
        corrects the CPU curve's scale. A job beside copies corrects the slowdown beside them (as
        a ratio to the corrected curve), and bounds the curve's scale from above (copies never
        speed the CPU up): a job that beat the curve's time alone lowers the scale, a scale
        below 1 moves toward the bound capped at 1 (so that noise, which only ever lowers it
        here, is undone by the jobs after), and then the slowdown explains the rest. Under
        hybrid every CPU job runs beside copies, and a calibration measured slow was otherwise
        never corrected (results/h200-llama-8layers-v3/). A divided expert's part is priced by
        a share curve measured at ``SHARE_CURVE_TOKENS``: at more tokens its price runs high,
        so such jobs do not bound the scale."""
        model = self.latency
        alone = sum(model.cpu(tokens[e]) for e in plan.cpu)
        if plan.split:
            alone += model.cpu_part(tokens[plan.split.expert], plan.split.cpu_fraction)
        if alone <= 0 or not self.adapt_cpu:
            return
        measured = seconds / alone
        if not (plan.copy or plan.split):
            self.cpu_factor = _smoothed(self.cpu_factor, measured, CPU_FACTOR_BOUNDS)
            return
        share_priced = plan.split is None or tokens[plan.split.expert] <= SHARE_CURVE_TOKENS
        if share_priced and (measured < self.cpu_factor or self.cpu_factor < 1.0):
            target = min(measured, max(self.cpu_factor, 1.0))
            self.cpu_factor = _smoothed(self.cpu_factor, target, CPU_FACTOR_BOUNDS)
        self.cpu_slowdown = _smoothed(self.cpu_slowdown, measured / self.cpu_factor, CPU_SLOWDOWN_BOUNDS)

    def _relax_cpu_factor(self) -> None:
        """A layer without CPU work: let a raised CPU correction decay toward the calibration."""
        if self.adapt_cpu and self.cpu_factor > 1.0:
            self.cpu_factor = 1.0 + (self.cpu_factor - 1.0) * self._cpu_factor_keep

    def learn_path_ends(self, plan: LayerPlan, offsets: tuple[float, float], cpu_done: float, landed: float) -> None:
        """Fold one layer's measured path ends (seconds from the routing read: the CPU job's end,
        the last copy's landing) into the paths' offsets: each moves toward how late its path
        ended against the plan's timeline without the offsets it was made with (``offsets``),
        kept within one expert's copy time either way."""
        bounds = (-self.latency.copy, self.latency.copy)
        self.cpu_offset = _smoothed(self.cpu_offset, cpu_done - (plan.cpu_done_s - offsets[0]), bounds)
        self.copy_offset = _smoothed(self.copy_offset, landed - (plan.copies_landed_s - offsets[1]), bounds)
        self._applied_offsets = tuple(
            _stepped(learned, PATH_OFFSET_STEP_S)
            if abs(learned - applied) >= PATH_OFFSET_HYSTERESIS * PATH_OFFSET_STEP_S
            else applied
            for learned, applied in zip((self.cpu_offset, self.copy_offset), self._applied_offsets, strict=True)
        )

    def _measure_paths(self) -> None:
        """Measure the last sampled layer's paths, whose events have happened by now (the
        routing read that follows it waited for them on the device)."""
        sample, self._path_sample = self._path_sample, None
        if sample is None or not self._adapt_paths:
            return
        if isinstance(sample.job, Future) and sample.job.exception() is not None:
            return  # a failed job: raised where it was taken in, and nothing to measure
        cpu_done = sample.job.result().end - sample.synced_at
        landed = elapsed_ms(sample.routed, sample.landed) / 1e3
        self.learn_path_ends(sample.plan, sample.offsets, cpu_done, landed)

    def __call__(self, layer: int, hidden: torch.Tensor, routing: Routing) -> torch.Tensor:
        clock = Clock(self.device) if self.layer_timing else None
        start = clock.now() if clock else 0.0
        host = HOST_CLOCK
        gpu_start = record(self.device, timing=True) if clock else None
        marks: dict[str, float] = {}
        num_tokens, top_k = routing.experts.shape
        flat = routing.experts.reshape(-1)
        order = torch.argsort(flat, stable=True)  # rows sorted by expert, on the accelerator
        # events to read one layer later; only in small passes (decode and beam steps), whose
        # hand-off differs from a prefill's by milliseconds (results/orchestration-h200/, run 11)
        # (not in a timed layer, which synchronises the device at its start)
        sampling = (
            self._adapt_paths
            and clock is None
            and self.device.type == "cuda"
            and flat.shape[0] <= MAIN_THREAD_GATHER_ROWS
        )
        routed = self._read_routing(flat, timing=sampling)
        # queued after the routing read, so that a long pass's hidden states (tens of MB) do not
        # hold the small read up on the device->host copy engine
        host_hidden, hidden_landed = self._send_hidden_down(hidden)
        flat_host = self._host_routing[: flat.shape[0]]
        # stream mode: the routing read waits (on the device) for the last CPU job; sleep on the
        # job first, then wait for the device's short rest, rather than spin through the CPU's
        # compute in the read's wait (a spinning main thread takes a core from the CPU kernel)
        self._take_in_pending()
        host_wait(routed)  # the one sync: the compute stream up to the routing read
        synced_at = host.now() if sampling else 0.0
        self._measure_paths()
        counts = torch.bincount(flat_host, minlength=self.config.num_experts).tolist()
        offsets = [0]
        for count in counts:
            offsets.append(offsets[-1] + count)
        tokens = {e: c for e, c in enumerate(counts) if c}
        routed_at = host.now()
        if clock:
            marks["routed"] = routed_at
        planned = self.planning_corrections
        plan = self.plan(layer, tokens, planned)
        if clock:
            marks["planned"] = host.now()
        split = plan.split
        # The CPU path is usually the layer's last to finish: it starts first, on activations
        # already in host memory, before anything is queued for the accelerator.
        cpu_experts = list(plan.cpu) + ([split.expert] if split else [])
        cpu_job = cpu_out = None
        if cpu_experts:
            # the accelerator's stable sort, repeated on the host: rows come back in its order
            token_of_row_host = torch.argsort(flat_host, stable=True) // top_k
            cpu_tokens = torch.cat([token_of_row_host[offsets[e] : offsets[e + 1]] for e in cpu_experts])
            cpu_job = self._start_cpu(
                layer, plan, counts, host_hidden, hidden_landed, cpu_tokens, marks if clock else None
            )
            cpu_out = _CpuJobOut(cpu_job, plan, tokens, routed_at)
            if self._cpu_mode == STREAM:
                self._pending = cpu_out  # taken in later even if this layer fails before its wait
        if clock:
            marks["cpu_submitted"] = host.now()
        token_of_row = order // top_k

        # Copies: the divided expert's remainder first, then whole experts.
        pending = ([(split.expert, split.cpu_blocks)] if split else []) + [(e, 0) for e in plan.copy]
        in_flight: collections.deque = collections.deque()
        copies_begin = record(self.device, self.copy_stream, timing=True) if clock and pending else None
        timed_copies = self.layer_timing or sampling
        for _ in range(min(len(self.slots), len(pending))):
            in_flight.append(self._queue_copy(layer, *pending.pop(0), self._take_slot(), timed_copies))
        landed_last = None

        sorted_out = hidden.new_empty(flat.shape[0], hidden.shape[-1])
        for expert in plan.gpu:
            self._run_on_accelerator(hidden, token_of_row, sorted_out, offsets, expert, *self.resident[(layer, expert)])
        while in_flight:
            expert, slot, landed, blocks = in_flight.popleft()
            wait(landed)
            landed_last = landed
            self._run_on_accelerator(
                hidden,
                token_of_row,
                sorted_out,
                offsets,
                expert,
                slot.w13b[: 2 * blocks * self.block],
                slot.w2b[:blocks],
            )
            slot.free = record(self.device)
            if pending:  # into the slot just freed: the copy waits for that compute
                in_flight.append(self._queue_copy(layer, *pending.pop(0), slot, timed_copies))

        gpu_done = record(self.device, timing=True) if clock else None
        issued_at = host.now()
        if clock:
            marks["issued"] = issued_at
        if cpu_out is not None:
            if self._cpu_mode == STREAM:
                self._signal.wait_on(self._signal_value)  # what follows waits for the worker's rows
            else:
                wait_over = self._take_in(cpu_out, issued_at)
                if clock:
                    marks["wait_over"] = wait_over
            rows = sum(counts[e] for e in cpu_experts)
            results = self._host_out[:rows].to(self.device, non_blocking=True)
            self._host_out_free = record(self.device)
            position = 0
            for expert in cpu_experts:  # each expert's rows are one run of the sorted order
                end = position + counts[expert]
                target = sorted_out[offsets[expert] : offsets[expert + 1]]
                if split and expert == split.expert:  # the accelerator already wrote its part
                    target.add_(results[position:end])
                else:
                    target.copy_(results[position:end])
                position = end
            if sampling and landed_last is not None:
                self._path_sample = _PathSample(routed, synced_at, landed_last, cpu_job, plan, planned[2:])
        else:
            self._relax_cpu_factor()
        outputs = torch.empty_like(sorted_out).index_copy_(0, order, sorted_out)
        # the hidden states' memory is the allocator's again once the layer's work is: order the
        # layer's end after their transfer down (long done in decode; beside the copies in prefill)
        wait(hidden_landed)
        self._count(plan, tokens, flat, hidden)
        if layer == self.config.num_layers - 1 or clock:
            # stream mode: after the last layer the caller reads the token on the host, and a
            # timed layer synchronises the device just below, each spinning on the device while
            # it waits for the CPU rows (a core taken from the CPU kernel): sleep on the job first
            self._take_in_pending()
        if clock:
            end = clock.now()
            measured = end - start
            self.counters.measured_s += measured
            job = cpu_job.result() if cpu_job else None
            if job:
                marks |= {
                    "cpu_picked": job.picked,
                    "cpu_inputs": job.inputs,
                    "cpu_begin": job.begin,
                    "cpu_end": job.end,
                }
            timeline = {k: 1e3 * (t - start) for k, t in marks.items()} | {"end": 1e3 * measured}
            on_gpu = {
                "copies_begin": elapsed_ms(gpu_start, copies_begin),
                "copies_landed": elapsed_ms(gpu_start, landed_last),
                "gpu_done": elapsed_ms(gpu_start, gpu_done),
            }
            self.layer_log.append(
                {
                    "layer": layer,
                    "tokens": tokens,
                    "gpu": plan.gpu,
                    "cpu": plan.cpu,
                    "copy": plan.copy,
                    "split": dataclasses.astuple(split) if split else None,
                    "predicted_s": plan.predicted_s,
                    "measured_s": measured,
                    "cpu_compute_s": job.seconds if job else 0.0,
                    # the main thread's wait for the worker (inline, it computed instead; stream,
                    # it did not wait: none)
                    "cpu_wait_s": (marks["wait_over"] - marks["issued"]) if job and self._cpu_mode == THREAD else 0.0,
                    "timeline_ms": timeline | {k: v for k, v in on_gpu.items() if v is not None},
                    "cpu_factor": planned[0],
                    "cpu_slowdown": planned[1],
                    "cpu_offset_ms": 1e3 * planned[2],
                    "copy_offset_ms": 1e3 * planned[3],
                }
            )
        return combine(outputs.view(num_tokens, top_k, -1), routing, hidden.dtype)

    def stats(self) -> dict[str, object]:
        self._take_in_pending()
        return {
            "executor": "fiddler",
            "policy": self.policy,
            "cpu_kernel": self.cpu_kernel.name,
            "cpu_rows_on": CPU_ROWS_ON[self._cpu_mode],
            "experts_resident": self.placement.num_resident,
            "staging_slots": len(self.slots),
            "split_blocks": self.blocks,
            "cpu_factor": self.cpu_factor,
            "cpu_slowdown": self.cpu_slowdown,
            "adapt_paths": self.adapt_paths,
            "cpu_offset_s": self.cpu_offset,
            "copy_offset_s": self.copy_offset,
            **self.counters.to_json(),
        }

    def reset_stats(self) -> None:
        self._take_in_pending()
        self.counters = ExpertCounters()
        self.layer_log = []

    def close(self) -> None:
        """Stop the CPU worker and release the page-locked host memory (after the device's
        queued work, which may still read it, when the stream mode has run); a CPU job's
        failure not yet raised is raised after."""
        try:
            self._take_in_pending()
        finally:
            self.cpu_worker.shutdown(wait=True)
            if self._signal is not None:
                synchronize(self.device)
            self.host.close()

    # ---- the three paths ----------------------------------------------------------------

    def _take_slot(self) -> _Slot:
        """The next slot, round robin (its ``free`` event orders any reuse)."""
        slot = self.slots[self._next_slot]
        self._next_slot = (self._next_slot + 1) % len(self.slots)
        return slot

    def _queue_copy(self, layer: int, expert: int, first_block: int, slot: _Slot, timing: bool = False):
        """Queue blocks [first_block, blocks) of one expert into ``slot`` on the side stream,
        after the GPU's last use of the slot. Returns (expert, slot, landed event (a timing one
        with ``timing``), blocks)."""
        w13b, w2b = self.host.experts[layer][expert]
        count = self.blocks - first_block
        rows = count * self.block
        with on_stream(self.copy_stream):
            wait(slot.free, self.copy_stream)  # the accelerator is done with the slot's last expert
            slot.w13b[: 2 * rows].copy_(w13b[2 * first_block * self.block :], non_blocking=True)
            slot.w2b[:count].copy_(w2b[first_block:], non_blocking=True)
            landed = record(self.device, self.copy_stream, timing=timing)
        return expert, slot, landed, count

    def _read_routing(self, flat: torch.Tensor, timing: bool = False) -> torch.cuda.Event | None:
        """Queue the routing ids' copy into page-locked host memory on the compute stream;
        returns the event of its landing (``self._host_routing`` holds them then; a timing event
        with ``timing``)."""
        if self._host_routing.shape[0] < flat.shape[0]:
            self._host_routing = torch.empty(flat.shape[0], dtype=flat.dtype, pin_memory=self.device.type == "cuda")
        self._host_routing[: flat.shape[0]].copy_(flat, non_blocking=True)
        return record(self.device, timing=timing)

    def _send_hidden_down(self, hidden: torch.Tensor) -> tuple[torch.Tensor | None, torch.cuda.Event | None]:
        """Queue the layer's hidden states into host memory on the down stream, after the
        routing read, so the CPU path starts with its inputs in place (no gather and no transfer
        after planning). Returns the host tensor and the event of its landing; ``None``s when
        the executor never computes on the CPU. The host buffer is reused by the next layer,
        whose transfer follows this one on the same stream, after this layer's CPU job."""
        if not self.uses_cpu:
            return None, None
        rows, width = hidden.shape
        if self._host_hidden.shape[0] < rows:
            pin = self.device.type == "cuda"
            self._host_hidden = torch.empty(rows, width, dtype=self.dtype, pin_memory=pin)
        host_hidden = self._host_hidden[:rows]
        wait(record(self.device), self.down_stream)  # the hidden states have been computed
        with on_stream(self.down_stream):
            host_hidden.copy_(hidden, non_blocking=True)
            landed = record(self.device, self.down_stream)
        return host_hidden, landed

    def _start_cpu(
        self,
        layer: int,
        plan: LayerPlan,
        counts: list[int],
        host_hidden: torch.Tensor | None,
        hidden_landed: torch.cuda.Event | None,
        cpu_tokens: torch.Tensor,
        marks: dict[str, float] | None = None,
    ) -> Future | _InlineJob:
        """Hand the CPU rows (the tokens ``cpu_tokens``, by expert in plan order) to the worker,
        or keep them for the main thread (``inline``); in ``stream`` mode the worker sets the
        signal's next value when they are written. A small job's rows are gathered here
        (``MAIN_THREAD_GATHER_ROWS``), and the worker is handed them with no tokens; ``marks``
        (a timed layer's timeline) then gets when the hidden states were in host memory
        (``hidden_down``), when the previous layer's results had left ``host_out``
        (``out_free``) and when the rows were gathered (``gathered``)."""
        if host_hidden is None:
            raise RuntimeError(f"policy {self.policy!r} planned CPU work, but its hidden states were not sent down")
        self._ensure_host_out(cpu_tokens.shape[0], host_hidden.shape[-1])
        out_free: torch.cuda.Event | None = self._host_out_free
        if self._cpu_mode != INLINE and cpu_tokens.shape[0] <= MAIN_THREAD_GATHER_ROWS:
            host_wait(hidden_landed)
            _mark(marks, "hidden_down")
            host_wait(out_free)
            _mark(marks, "out_free")
            host_hidden, hidden_landed, cpu_tokens, out_free = host_hidden.index_select(0, cpu_tokens), None, None, None
            _mark(marks, "gathered")
        work = [(counts[e], *self.host.experts[layer][e]) for e in plan.cpu]
        if plan.split:
            w13b, w2b = self.host.experts[layer][plan.split.expert]
            blocks = plan.split.cpu_blocks
            work.append((counts[plan.split.expert], w13b[: 2 * blocks * self.block], w2b[:blocks]))
        args = (work, host_hidden, hidden_landed, cpu_tokens, self._host_out, out_free)
        if self._cpu_mode == INLINE:
            return _InlineJob(functools.partial(self._cpu_work, *args))
        signal = None
        if self._cpu_mode == STREAM:
            self._signal_value += 1
            signal = (self._signal, self._signal_value)
        return self.cpu_worker.submit(self._cpu_work, *args, signal)

    def _cpu_work(
        self,
        work: list[tuple[int, torch.Tensor, torch.Tensor]],
        host_hidden: torch.Tensor,
        hidden_landed: torch.cuda.Event | None,
        tokens: torch.Tensor | None,
        host_out: torch.Tensor,
        out_free: torch.cuda.Event | None,
        signal: tuple[HostSignal, int] | None = None,
    ) -> _CpuJob:
        """The CPU rows of one layer, on the worker thread (or the main thread, ``inline``);
        returns when they are computed. ``signal``: (signal, value) to set once they are
        written, even when computing them failed (the stream would otherwise wait forever;
        the failure is raised when the job is taken in)."""
        try:
            clock = HOST_CLOCK
            picked = clock.now()
            host_wait(hidden_landed)  # the layer's hidden states are in host memory
            inputs = clock.now()
            # tokens None: the main thread gathered the rows (a small job)
            host_in = host_hidden if tokens is None else host_hidden.index_select(0, tokens)
            host_wait(out_free)  # the previous layer's results have left host_out
            begin = clock.now()
            position = 0
            for count, w13b, w2b in work:
                end = position + count
                host_out[position:end] = self.cpu_kernel(host_in[position:end], w13b, w2b)
                position = end
            return _CpuJob(picked, inputs, begin, clock.now())
        finally:
            if signal is not None:
                signal[0].set(signal[1])

    def _ensure_host_out(self, rows: int, hidden: int) -> None:
        if self._host_out.shape[0] < rows:
            host_wait(self._host_out_free)  # nothing may still be reading the old buffer
            pin = self.device.type == "cuda"
            self._host_out = torch.empty(rows, hidden, dtype=self.dtype, pin_memory=pin)
            self._host_out_free = None

    def _run_on_accelerator(self, hidden, token_of_row, sorted_out, offsets, expert, w13b, w2b) -> None:
        rows = slice(offsets[expert], offsets[expert + 1])
        sorted_out[rows] = split_ffn(hidden.index_select(0, token_of_row[rows]), w13b, w2b)

    def _take_in(self, out: _CpuJobOut, issued_at: float | None = None) -> float:
        """Wait for a CPU job (re-raising a failure in the worker), fold it into the in-run
        corrections and count it; returns when the wait was over (host clock). ``issued_at``:
        when the main thread had issued the accelerator's work (thread and inline modes)."""
        clock = HOST_CLOCK
        asked = clock.now()
        done = out.job.result()
        wait_over = clock.now()
        self._learn_cpu_factor(out.plan, out.tokens, done.seconds)
        c = self.counters
        c.cpu_jobs += 1
        c.cpu_start_s += done.begin - out.routed_at
        c.cpu_compute_s += done.seconds
        # the main thread waited from issuing the accelerator's work (thread) or from asking at
        # the next layer (stream); inline, it computed instead
        waited_from = asked if issued_at is None else issued_at
        c.cpu_wait_s += 0.0 if self._cpu_mode == INLINE else wait_over - waited_from
        return wait_over

    def _take_in_pending(self) -> None:
        """Take in the stream-mode CPU job still out, if any."""
        out, self._pending = self._pending, None
        if out is not None:
            self._take_in(out)

    def _count(self, plan: LayerPlan, tokens: dict[int, int], flat: torch.Tensor, hidden: torch.Tensor) -> None:
        c = self.counters
        row_bytes = hidden.shape[-1] * hidden.element_size()
        split_rows = tokens[plan.split.expert] if plan.split else 0
        cpu_rows = sum(tokens[e] for e in plan.cpu) + split_rows
        copied_blocks = len(plan.copy) * self.blocks + (self.blocks - plan.split.cpu_blocks if plan.split else 0)
        c.layers += 1
        c.experts_gpu += len(plan.gpu)
        c.experts_cpu += len(plan.cpu)
        c.experts_copied += len(plan.copy)
        c.experts_split += 1 if plan.split else 0
        c.rows_gpu += sum(tokens[e] for e in plan.gpu)
        c.rows_cpu += cpu_rows - split_rows
        c.rows_copied += sum(tokens[e] for e in plan.copy)
        c.rows_split += split_rows
        c.h2d_bytes += copied_blocks * self.expert_bytes // self.blocks + cpu_rows * row_bytes
        sent_down = hidden.shape[0] if self.uses_cpu else 0  # every layer's hidden states, with its routing
        c.d2h_bytes += sent_down * row_bytes + flat.numel() * flat.element_size()
        c.predicted_s += plan.predicted_s
