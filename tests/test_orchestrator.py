"""Fiddler's executor on the CPU (standing in for the GPU): same numbers as the resident
model for every placement and policy, and counters that match the plans it made."""

import dataclasses
import random
import threading
import time

import pytest
import torch
from conftest import PROMPT
from test_planner import HOST_LIKE, PAPER_LIKE

import fiddler.orchestrator
from fiddler.config import ModelConfig
from fiddler.cpu_experts import make_kernel
from fiddler.engine import Engine
from fiddler.generate import GenerationSettings, generate
from fiddler.orchestrator import CPU_FACTOR_BOUNDS, CPU_MODES, INLINE, MAIN_THREAD_GATHER_ROWS, STREAM, THREAD
from fiddler.placement import plan_placement
from fiddler.planner import POLICIES, LayerPlan, Split, plan_layer
from fiddler.weights import RandomWeights

FP32_TOL = 1e-4
HANG_S = 60  # far beyond what the tiny model's generations take
CONFIG = ModelConfig.preset("mixtral-tiny")
SOURCE = RandomWeights(CONFIG, seed=11)


def placement_with(resident: set[tuple[int, int]]):
    base = plan_placement(CONFIG, 1.0, torch.float32, 128)
    return dataclasses.replace(base, resident=frozenset(resident))


def random_placement(rng: random.Random):
    pairs = [(layer, e) for layer in range(CONFIG.num_layers) for e in range(CONFIG.num_experts)]
    return placement_with(set(rng.sample(pairs, rng.randint(0, len(pairs)))))


def fiddler_engine(placement, policy, latency=HOST_LIKE, slots=2, timing=False):
    return Engine.fiddler(
        SOURCE,
        "cpu",
        torch.float32,
        128,
        placement,
        latency,
        policy,
        make_kernel("torch"),
        staging_slots=slots,
        layer_timing=timing,
    )


@pytest.fixture(scope="module")
def reference():
    return Engine.resident(SOURCE, "cpu", torch.float32, 128)


@pytest.mark.parametrize("policy", POLICIES)
def test_outputs_match_the_resident_model(reference, policy):
    rng = random.Random(hash(policy) % 1000)
    for _ in range(3):
        placement = random_placement(rng)
        engine = fiddler_engine(placement, policy, latency=rng.choice([HOST_LIKE, PAPER_LIKE]), slots=rng.randint(1, 3))
        for settings in (GenerationSettings(max_new_tokens=8), GenerationSettings(max_new_tokens=5, beam_width=3)):
            want = generate(reference, PROMPT, settings).token_ids
            assert generate(engine, PROMPT, settings).token_ids == want
        engine.close()


@pytest.mark.parametrize("policy", POLICIES)
def test_teacher_forced_logits_match(reference, policy):
    engine = fiddler_engine(random_placement(random.Random(5)), policy)
    continuation = [17, 900, 31000, 5]
    for e in (reference, engine):
        e.begin(1, len(PROMPT) + len(continuation))
    got = [engine.prefill(torch.tensor(PROMPT))[0]]
    want = [reference.prefill(torch.tensor(PROMPT))[0]]
    for token in continuation:
        got.append(engine.decode(torch.tensor([token]))[0])
        want.append(reference.decode(torch.tensor([token]))[0])
    for a, b in zip(got, want, strict=True):
        assert (a - b).abs().max() < FP32_TOL
    engine.close()


def replay_plans(engine, policy, latency, slots):
    """Recompute every plan from the executor's layer log and sum what it should have counted."""
    executor = engine.model.experts
    keys = ("experts_gpu", "experts_cpu", "experts_copied", "experts_split", "rows_cpu", "rows_copied", "rows_split")
    expected = dict.fromkeys(keys, 0)
    expected["copied_blocks"] = 0
    for entry in executor.layer_log:
        resident = executor.resident_by_layer[entry["layer"]]
        model = latency.with_cpu_factor(entry["cpu_factor"], entry["cpu_slowdown"])  # the corrections it planned with
        rows_down = sum(entry["tokens"].values()) // CONFIG.num_experts_per_token if executor.uses_cpu else None
        plan = plan_layer(entry["tokens"], resident, policy, model, slots, executor.blocks, rows_down)
        split = (plan.split.expert, plan.split.cpu_blocks, plan.split.blocks) if plan.split else None
        assert (plan.gpu, plan.cpu, plan.copy, split) == (entry["gpu"], entry["cpu"], entry["copy"], entry["split"])
        expected["experts_gpu"] += len(plan.gpu)
        expected["experts_cpu"] += len(plan.cpu)
        expected["experts_copied"] += len(plan.copy)
        expected["experts_split"] += 1 if plan.split else 0
        expected["rows_cpu"] += sum(entry["tokens"][e] for e in plan.cpu)
        expected["rows_copied"] += sum(entry["tokens"][e] for e in plan.copy)
        expected["rows_split"] += entry["tokens"][plan.split.expert] if plan.split else 0
        expected["copied_blocks"] += len(plan.copy) * executor.blocks
        expected["copied_blocks"] += executor.blocks - plan.split.cpu_blocks if plan.split else 0
    return expected


@pytest.mark.parametrize("policy", POLICIES)
def test_counters_match_the_plans(policy):
    placement = random_placement(random.Random(3))
    engine = fiddler_engine(placement, policy, timing=True)
    result = generate(engine, PROMPT, GenerationSettings(max_new_tokens=6))
    stats = result.stats
    expected = replay_plans(engine, policy, HOST_LIKE, 2)
    copied_blocks = expected.pop("copied_blocks")
    for key, value in expected.items():
        assert stats[key] == value, key
    executor = engine.model.experts
    block_bytes = executor.expert_bytes // executor.blocks
    row_bytes = CONFIG.hidden_size * 4
    cpu_rows = stats["rows_cpu"] + stats["rows_split"]
    assert stats["h2d_bytes"] == copied_blocks * block_bytes + cpu_rows * row_bytes
    routing_ids = (len(PROMPT) + 5) * CONFIG.num_experts_per_token * CONFIG.num_layers * 8  # int64 ids read
    # every layer's hidden states go down with its routing, unless the policy never uses the CPU
    hidden_rows = 0 if policy == "copy-experts" else (len(PROMPT) + 5) * CONFIG.num_layers
    assert stats["d2h_bytes"] == hidden_rows * row_bytes + routing_ids
    assert stats["layers"] == CONFIG.num_layers * 6
    paths = ("gpu", "cpu", "copied", "split")
    decode = result.decode_counters(["layers", *(f"rows_{p}" for p in paths)])  # 5 steps of 1 token
    assert decode["layers"] == CONFIG.num_layers * 5
    rows = sum(decode[f"rows_{path}"] for path in paths)
    assert rows == 5 * CONFIG.num_layers * CONFIG.num_experts_per_token
    assert all(decode[f"rows_{path}"] >= 0 for path in paths)
    engine.close()


def test_copy_experts_copies_every_miss_and_cpu_experts_copies_none():
    placement = placement_with({(0, 0), (1, 1)})
    copy = generate(fiddler_engine(placement, "copy-experts"), PROMPT, GenerationSettings(max_new_tokens=4)).stats
    cpu = generate(fiddler_engine(placement, "cpu-experts"), PROMPT, GenerationSettings(max_new_tokens=4)).stats
    assert copy["experts_cpu"] == 0 and copy["experts_copied"] > 0
    assert cpu["experts_copied"] == 0 and cpu["experts_cpu"] == copy["experts_copied"]
    assert cpu["experts_gpu"] == copy["experts_gpu"] and cpu["rows_gpu"] == copy["rows_gpu"]
    assert cpu["h2d_bytes"] < copy["h2d_bytes"]
    assert 0 < copy["gpu_hit_rate"] < 1


def test_switching_policy_on_one_executor_follows_the_new_policy(reference):
    """Experiments switch ``policy`` on a built executor: whether hidden states go down to the
    CPU follows the policy in force, both ways."""
    settings = GenerationSettings(max_new_tokens=4)
    want = generate(reference, PROMPT, settings).token_ids
    placement = placement_with({(0, 0), (1, 1)})
    for built, switched in (("hybrid", "copy-experts"), ("copy-experts", "cpu-experts")):
        engine = fiddler_engine(placement, built)
        executor = engine.model.experts
        executor.policy = switched
        result = generate(engine, PROMPT, settings)
        assert result.token_ids == want
        routing_ids = (len(PROMPT) + 3) * CONFIG.num_experts_per_token * CONFIG.num_layers * 8
        hidden = result.stats["d2h_bytes"] - routing_ids
        assert executor.uses_cpu == (switched != "copy-experts")
        assert (hidden == 0) == (switched == "copy-experts")
        engine.close()


def test_another_calibration_replaces_the_plans_and_corrections(reference):
    """Experiments compare CPU thread counts on one engine, each planned with the calibration
    measured under it: after ``use_calibration`` every plan is the new model's (none kept from
    the old one's cache), the corrections start from it, and outputs stay exact."""
    placement = placement_with({(0, 0), (1, 1)})
    engine = fiddler_engine(placement, "hybrid")
    executor = engine.model.experts
    settings = GenerationSettings(max_new_tokens=4)
    want = generate(reference, PROMPT, settings).token_ids
    assert generate(engine, PROMPT, settings).token_ids == want
    fresh = fiddler_engine(placement, "hybrid", latency=PAPER_LIKE).model.experts
    executor.adapt_cpu = fresh.adapt_cpu = False
    cases = [{e: n} | {(e + 1) % CONFIG.num_experts: 1} for e in range(CONFIG.num_experts) for n in (1, 3, 40)]
    before = [executor.plan(layer, t) for layer in range(CONFIG.num_layers) for t in cases]
    executor.use_calibration(PAPER_LIKE, make_kernel("torch"))
    assert executor.latency is PAPER_LIKE
    assert (executor.cpu_factor, executor.cpu_slowdown) == (1.0, PAPER_LIKE.cpu_slowdown)
    after = [executor.plan(layer, t) for layer in range(CONFIG.num_layers) for t in cases]
    assert after == [fresh.plan(layer, t) for layer in range(CONFIG.num_layers) for t in cases]
    assert after != before  # the two models plan some layer differently: the check can fail
    executor.adapt_cpu = True
    assert generate(engine, PROMPT, settings).token_ids == want
    engine.close()
    fresh.close()


def test_a_thread_count_set_between_generations_reaches_the_cpu_worker():
    """Torch takes its thread count up once per thread: set on the main thread alone after the
    worker's first job, it would not reach the worker that computes the CPU experts."""
    before = torch.get_num_threads()
    engine = fiddler_engine(placement_with(set()), "cpu-experts")
    executor = engine.model.experts
    try:
        executor.use_cpu_threads(2)
        generate(engine, PROMPT, GenerationSettings(max_new_tokens=2))  # the worker has computed
        assert executor.use_cpu_threads(1) == 1
        assert executor.cpu_worker.submit(torch.get_num_threads).result() == 1
        assert torch.get_num_threads() == 1
    finally:
        executor.use_cpu_threads(before)
        engine.close()


def test_hybrid_divides_an_expert_when_that_balances_the_paths(reference):
    """With one missing expert per layer, whole-expert splitting leaves one path idle."""
    missing = {(layer, 0) for layer in range(CONFIG.num_layers)}
    everything = {(layer, e) for layer in range(CONFIG.num_layers) for e in range(CONFIG.num_experts)}
    engine = fiddler_engine(placement_with(everything - missing), "hybrid", timing=True)
    result = generate(engine, PROMPT, GenerationSettings(max_new_tokens=6))
    assert result.stats["experts_split"] > 0
    assert any(entry["split"] for entry in engine.model.experts.layer_log)
    assert result.token_ids == generate(reference, PROMPT, GenerationSettings(max_new_tokens=6)).token_ids
    engine.close()


def test_hybrid_really_uses_both_paths_when_planned():
    engine = fiddler_engine(placement_with(set()), "hybrid", timing=True)
    stats = generate(engine, PROMPT, GenerationSettings(max_new_tokens=4)).stats
    both = [e for e in engine.model.experts.layer_log if e["cpu"] and e["copy"]]
    assert both, "the host-like latency model should split the prefill layers"
    assert stats["experts_cpu"] + stats["experts_split"] > 0
    assert stats["experts_copied"] + stats["experts_split"] > 0
    engine.close()


def test_repeated_random_runs_do_not_race(reference):
    """Side stream, CPU worker and main loop: many short runs with one staging slot."""
    rng = random.Random(42)
    for trial in range(12):
        prompt = [1, *(rng.randrange(3, CONFIG.vocab_size) for _ in range(rng.randint(2, 20)))]
        engine = fiddler_engine(random_placement(rng), rng.choice(POLICIES), slots=1)
        settings = GenerationSettings(max_new_tokens=rng.randint(1, 6), beam_width=rng.choice([1, 2]))
        assert generate(engine, prompt, settings).token_ids == generate(reference, prompt, settings).token_ids, trial
        engine.close()


def test_cpu_latencies_are_corrected_in_the_run():
    """The tiny model's CPU experts take microseconds, far below the host-like model."""
    placement = placement_with(set())
    adapting = fiddler_engine(placement, "cpu-experts")
    stats = generate(adapting, PROMPT, GenerationSettings(max_new_tokens=4)).stats
    assert stats["cpu_factor"] < 0.5
    assert stats["cpu_slowdown"] == HOST_LIKE.cpu_slowdown  # no job had copies beside it
    fixed = Engine.fiddler(SOURCE, "cpu", torch.float32, 128, placement, HOST_LIKE, "cpu-experts", make_kernel("torch"))
    fixed.model.experts.adapt_cpu = False
    assert generate(fixed, PROMPT, GenerationSettings(max_new_tokens=4)).stats["cpu_factor"] == 1.0
    adapting.close()
    fixed.close()


def test_a_raised_cpu_correction_that_shuts_the_cpu_path_relaxes():
    """On the GPU host a few slow CPU jobs raised paper's correction past the point where
    copying wins; with no CPU job left to measure it stayed there for the run. Layers without
    CPU work now let it decay toward the calibration, so the CPU path is tried again."""
    copy_at_3x_cpu = dataclasses.replace(PAPER_LIKE, copy=3 * PAPER_LIKE.cpu_expert_s[0])
    engine = fiddler_engine(placement_with(set()), "paper", latency=copy_at_3x_cpu)
    executor = engine.model.experts
    assert executor.plan(0, {0: 1}).cpu, "a copy at 3x a CPU expert: one token's expert goes to the CPU"
    executor.cpu_factor = CPU_FACTOR_BOUNDS[1]  # the most a run can learn: past the point (~3) where copies win
    assert not executor.plan(0, {0: 1}).cpu
    stats = generate(engine, PROMPT, GenerationSettings(max_new_tokens=6)).stats
    assert stats["experts_copied"] > 0 and stats["experts_cpu"] > 0
    assert stats["cpu_factor"] < 1.0  # the CPU was tried again, and measured fast (tiny experts)
    engine.close()


def test_layer_timeline_is_in_order():
    """With layer timing, each layer's timeline (ms from its start) runs in the order the
    executor works: routing known, CPU job submitted, accelerator work issued, end; the CPU
    worker begins after the routing is known (it may begin before the submission's own mark)
    and ends before the main thread's wait is over."""
    engine = fiddler_engine(placement_with(set()), "hybrid", timing=True)
    generate(engine, PROMPT, GenerationSettings(max_new_tokens=3))
    log = engine.model.experts.layer_log
    assert log
    assert any("gathered" in entry["timeline_ms"] for entry in log)  # decode's jobs are small
    for entry in log:
        t = entry["timeline_ms"]
        assert 0 <= t["routed"] <= t["planned"] <= t["cpu_submitted"] <= t["issued"] <= t["end"]
        if "gathered" in t:  # a small job's rows, gathered on the main thread
            assert t["planned"] <= t["hidden_down"] <= t["out_free"] <= t["gathered"] <= t["cpu_submitted"]
        if entry["cpu"] or entry["split"]:
            assert (
                t["routed"]
                <= t["cpu_picked"]
                <= t["cpu_inputs"]
                <= t["cpu_begin"]
                <= t["cpu_end"]
                <= t["wait_over"]
                <= t["end"]
            )
            assert entry["cpu_compute_s"] == pytest.approx((t["cpu_end"] - t["cpu_begin"]) / 1e3)
            assert entry["cpu_wait_s"] == pytest.approx((t["wait_over"] - t["issued"]) / 1e3)
    assert any(e["cpu"] or e["split"] for e in log)
    engine.close()


def test_the_cpu_paths_host_timing_is_counted_in_every_run():
    """Without layer timing too, the counters time the CPU path on the host clock: they agree
    with the timed layers' own logs, and the prefill's share is read off the snapshot."""
    engine = fiddler_engine(placement_with(set()), "hybrid", timing=True)
    result = generate(engine, PROMPT, GenerationSettings(max_new_tokens=3))
    log = [e for e in engine.model.experts.layer_log if e["cpu"] or e["split"]]
    stats = result.stats
    assert stats["cpu_jobs"] == len(log) > 0
    assert stats["cpu_compute_s"] == pytest.approx(sum(e["cpu_compute_s"] for e in log))
    assert stats["cpu_wait_s"] == pytest.approx(sum(e["cpu_wait_s"] for e in log))
    starts = [(e["timeline_ms"]["cpu_begin"] - e["timeline_ms"]["routed"]) / 1e3 for e in log]
    assert stats["cpu_start_s"] == pytest.approx(sum(starts)) and min(starts) >= 0
    decode = result.decode_counters(["cpu_jobs", "cpu_start_s"])
    assert 0 < decode["cpu_jobs"] < stats["cpu_jobs"]  # the prefill's jobs are left out
    engine.close()
    untimed = fiddler_engine(placement_with(set()), "hybrid")
    stats = generate(untimed, PROMPT, GenerationSettings(max_new_tokens=3)).stats
    assert stats["cpu_jobs"] > 0 and stats["cpu_start_s"] > 0 and stats["cpu_compute_s"] > 0
    untimed.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the accelerator's timeline needs CUDA events")
def test_layer_timeline_on_cuda_has_the_accelerators_marks():
    engine = Engine.fiddler(
        SOURCE, "cuda", torch.float32, 128, placement_with(set()), HOST_LIKE, "hybrid", make_kernel("torch")
    )
    engine.model.experts.layer_timing = True
    generate(engine, PROMPT, GenerationSettings(max_new_tokens=3))
    with_copies = [e for e in engine.model.experts.layer_log if e["copy"] or e["split"]]
    assert with_copies
    for entry in with_copies:
        t = entry["timeline_ms"]
        assert 0 <= t["copies_begin"] <= t["copies_landed"] <= t["gpu_done"] <= t["end"]
    engine.close()


@pytest.mark.parametrize("policy", POLICIES)
def test_cpu_rows_on_the_main_thread_match(reference, policy):
    """cpu_mode inline: the main thread computes the CPU rows after queuing the accelerator's
    work; the same tokens as the resident model, and the CPU job starts after that work was issued."""
    engine = fiddler_engine(random_placement(random.Random(7)), policy, latency=PAPER_LIKE, timing=True)
    engine.model.experts.cpu_mode = INLINE
    for settings in (GenerationSettings(max_new_tokens=6), GenerationSettings(max_new_tokens=4, beam_width=2)):
        result = generate(engine, PROMPT, settings)
        assert result.token_ids == generate(reference, PROMPT, settings).token_ids
    assert result.stats["cpu_rows_on"] == "main thread"
    with_cpu = [e for e in engine.model.experts.layer_log if e["cpu"] or e["split"]]
    assert with_cpu or policy == "copy-experts"
    for entry in with_cpu:
        t = entry["timeline_ms"]
        assert t["issued"] <= t["cpu_picked"] <= t["cpu_inputs"] <= t["cpu_begin"] <= t["cpu_end"] <= t["wait_over"]
    engine.close()


@pytest.mark.parametrize("policy", POLICIES)
def test_stream_mode_matches_and_takes_every_job_in(reference, policy):
    """cpu_mode stream: the CPU rows' way up waits on the worker's signal instead of the main
    thread waiting, and each job is taken in at the next layer; the same tokens as the resident
    model, and the same jobs, plans and counters as the thread mode of one executor. The in-run
    CPU corrections are off: they follow the jobs' measured times, which differ from run to run,
    so with them the plans may differ by timing (they did on the GPU host)."""
    placement = random_placement(random.Random(13))
    counted = ("cpu_jobs", "experts_cpu", "experts_copied", "experts_split", "rows_cpu", "rows_split", "h2d_bytes")
    stats = {}
    for mode in (THREAD, STREAM):
        engine = fiddler_engine(placement, policy, latency=PAPER_LIKE)
        engine.model.experts.cpu_mode = mode
        engine.model.experts.adapt_cpu = False
        for settings in (GenerationSettings(max_new_tokens=6), GenerationSettings(max_new_tokens=4, beam_width=2)):
            result = generate(engine, PROMPT, settings)
            assert result.token_ids == generate(reference, PROMPT, settings).token_ids
        stats[mode] = result.stats
        engine.close()
    assert stats[STREAM]["cpu_rows_on"] == "worker thread, stream waits"
    assert {k: stats[STREAM][k] for k in counted} == {k: stats[THREAD][k] for k in counted}
    assert stats[STREAM]["cpu_jobs"] > 0 or policy == "copy-experts"


def test_stream_mode_timeline_has_no_main_thread_wait():
    """Timed layers in stream mode: the CPU job is taken in at the layer's end (the device is
    synchronised there), its marks are logged, and the main thread's wait is none."""
    engine = fiddler_engine(placement_with(set()), "hybrid", timing=True)
    engine.model.experts.cpu_mode = STREAM
    result = generate(engine, PROMPT, GenerationSettings(max_new_tokens=3))
    with_cpu = [e for e in engine.model.experts.layer_log if e["cpu"] or e["split"]]
    assert with_cpu and result.stats["cpu_jobs"] == len(with_cpu)
    for entry in with_cpu:
        t = entry["timeline_ms"]
        assert "wait_over" not in t and entry["cpu_wait_s"] == 0.0
        assert t["routed"] <= t["cpu_picked"] <= t["cpu_inputs"] <= t["cpu_begin"] <= t["cpu_end"] <= t["end"]
    engine.close()


def test_timed_stream_layers_take_the_job_in_before_synchronising(monkeypatch):
    """A timed layer synchronises the device at its end, which on CUDA spins while the stream
    waits for the CPU rows (a core taken from the CPU kernel): the job is taken in, sleeping,
    before that reading, so the timed CPU compute is the untimed one's."""
    engine = fiddler_engine(placement_with(set()), "hybrid", timing=True)
    executor = engine.model.experts
    executor.cpu_mode = STREAM
    job_out_at_reading: list[bool] = []
    layer_clocks: set[int] = set()
    real_clock = fiddler.orchestrator.Clock

    class NotingClock(real_clock):
        def now(self) -> float:
            if id(self) in layer_clocks:
                job_out_at_reading.append(executor._pending is not None)
            return super().now()

    layer_call = type(executor).__call__
    at_layer_ends: list[bool] = []

    def noting_layer(self, *args, **kwargs):
        job_out_at_reading.clear()
        layer_clocks.clear()
        out = layer_call(self, *args, **kwargs)
        at_layer_ends.append(job_out_at_reading[-1])  # the layer clock's last reading: its end
        return out

    def first_clock_is_the_layers(device):
        made = NotingClock(device)
        if not layer_clocks:  # the executor makes its layer clock first in each call
            layer_clocks.add(id(made))
        return made

    monkeypatch.setattr(fiddler.orchestrator, "Clock", first_clock_is_the_layers)
    monkeypatch.setattr(type(executor), "__call__", noting_layer)
    generate(engine, PROMPT, GenerationSettings(max_new_tokens=3))
    assert at_layer_ends and not any(at_layer_ends)
    assert len(executor.layer_log) == len(at_layer_ends)
    executor.close()


@pytest.mark.parametrize("mode", [THREAD, STREAM])
def test_a_decode_steps_rows_are_gathered_before_the_hand_off(reference, mode):
    """A job of at most MAIN_THREAD_GATHER_ROWS rows reaches the worker gathered (no tokens to
    gather by), a longer prompt's job with its tokens; the tokens are the resident model's."""
    engine = fiddler_engine(placement_with(set()), "cpu-experts")
    executor = engine.model.experts
    executor.cpu_mode = mode
    handed: list[tuple[int, bool]] = []  # (rows, gathered before the hand-off)
    cpu_work = executor._cpu_work

    def noting_work(work, host_hidden, hidden_landed, tokens, *rest):
        handed.append((sum(count for count, _, _ in work), tokens is None))
        return cpu_work(work, host_hidden, hidden_landed, tokens, *rest)

    executor._cpu_work = noting_work
    prompt = list(range(1, MAIN_THREAD_GATHER_ROWS + 2))  # its prefill routes more rows than that
    settings = GenerationSettings(max_new_tokens=3)
    assert generate(engine, prompt, settings).token_ids == generate(reference, prompt, settings).token_ids
    assert all(gathered == (rows <= MAIN_THREAD_GATHER_ROWS) for rows, gathered in handed)
    assert any(gathered for _, gathered in handed) and not all(gathered for _, gathered in handed)
    engine.close()


def test_a_failed_cpu_job_in_stream_mode_is_raised_not_hung():
    """The worker sets the signal even when its job fails (the stream would wait forever), and
    the failure is raised when the job is taken in."""
    engine = fiddler_engine(placement_with(set()), "cpu-experts")
    executor = engine.model.experts
    executor.cpu_mode = STREAM

    def broken(x, w13b, w2b):
        raise RuntimeError("kernel failed")

    executor.cpu_kernel = broken
    raised: list[BaseException] = []

    def run():
        try:
            generate(engine, PROMPT, GenerationSettings(max_new_tokens=2))
        except RuntimeError as err:
            raised.append(err)

    thread = threading.Thread(target=run, daemon=True)  # a hang fails the test, not the suite
    thread.start()
    thread.join(timeout=HANG_S)
    assert not thread.is_alive(), "a failed CPU job left the executor waiting"
    assert raised and "kernel failed" in str(raised[0])
    engine.close()


class _SlowKernel:
    """The torch kernel after a sleep."""

    name = "torch-slowed"

    def __init__(self, seconds: float):
        self.seconds, self.inner = seconds, make_kernel("torch")

    def __call__(self, x, w13b, w2b):
        time.sleep(self.seconds)
        return self.inner(x, w13b, w2b)


class _NotingJobEnds:
    """The executor's CPU worker, noting when each job it ran ended (jobs run one at a time)."""

    def __init__(self, pool):
        self.pool, self.ends = pool, []

    def submit(self, work, *args):
        def noted(*work_args):
            try:
                return work(*work_args)
            finally:  # before the job's future is done: no waiter can run ahead of this note
                self.ends.append(time.perf_counter())

        return self.pool.submit(noted, *args)

    def shutdown(self, wait: bool = True) -> None:
        self.pool.shutdown(wait=wait)


class _NotingReturns:
    """An executor wrapper noting when each layer call returned."""

    def __init__(self, inner):
        self.inner, self.returns = inner, []

    def __call__(self, *args):
        out = self.inner(*args)
        self.returns.append(time.perf_counter())
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="running ahead needs a CUDA stream to wait")
def test_stream_mode_runs_ahead_of_slow_cpu_jobs_on_cuda():
    """With every expert on a slowed CPU, the thread mode's layer calls return after their CPU
    job ended and the stream mode's before (the main thread queued the rest and went on), but
    for the model's last layer, which waits for its job (the token's read would spin); the same
    tokens."""
    tokens, ahead, last_ahead = {}, {}, {}
    last = CONFIG.num_layers - 1
    for mode in (THREAD, STREAM):
        engine = Engine.fiddler(
            SOURCE, "cuda", torch.float32, 128, placement_with(set()), HOST_LIKE, "cpu-experts", _SlowKernel(0.02)
        )
        executor = engine.model.experts
        executor.cpu_mode = mode
        jobs = executor.cpu_worker = _NotingJobEnds(executor.cpu_worker)
        noted = _NotingReturns(executor)
        engine.set_executor(noted)
        tokens[mode] = generate(engine, PROMPT, GenerationSettings(max_new_tokens=4)).token_ids
        # nothing is resident: every layer call hands out one CPU job
        pairs = list(zip(noted.returns, jobs.ends, strict=True))
        inner = [r < e for i, (r, e) in enumerate(pairs) if i % CONFIG.num_layers != last]
        ahead[mode] = sum(inner) / len(inner)
        last_ahead[mode] = any(r < e for i, (r, e) in enumerate(pairs) if i % CONFIG.num_layers == last)
        engine.close()
    assert tokens[STREAM] == tokens[THREAD]
    assert ahead[THREAD] == 0.0 and ahead[STREAM] > 0.5
    assert not last_ahead[THREAD] and not last_ahead[STREAM]


def test_cpu_mode_is_checked():
    engine = fiddler_engine(placement_with(set()), "hybrid")
    with pytest.raises(ValueError, match="cpu_mode must be one of"):
        engine.model.experts.cpu_mode = "async"
    assert set(CPU_MODES) == {THREAD, INLINE, STREAM}
    engine.close()


def test_jobs_beside_copies_that_beat_the_curve_lower_it():
    """Under hybrid, CPU jobs run beside copies. The tiny model's jobs take microseconds, far
    below the host-like curve even beside copies (which never speed the CPU up): the curve
    itself is slow, so they lower its scale and bring the slowdown to its floor of 1. On the
    GPU host a calibration taken on a disturbed host priced the CPU ~1.4x slow, and hybrid
    could not learn otherwise while every job had copies beside it."""
    engine = fiddler_engine(placement_with(set()), "hybrid", timing=True)
    executor = engine.model.experts
    generate(engine, PROMPT, GenerationSettings(max_new_tokens=4))
    beside = [e for e in executor.layer_log if (e["cpu"] or e["split"]) and (e["copy"] or e["split"])]
    alone = [e for e in executor.layer_log if (e["cpu"] or e["split"]) and not (e["copy"] or e["split"])]
    assert beside and not alone, "the host-like model should make hybrid run both paths in every CPU layer"
    assert executor.cpu_slowdown == 1.0
    assert executor.cpu_factor < 0.5
    engine.close()


def test_path_offsets_are_learned_from_where_the_paths_ended(reference):
    """``adapt_paths``: measured path ends (seconds from the routing read) move the offsets toward
    how late each path ended against the plan, the planning model carries them (stepped), and
    copies measured late give the CPU more of the divided expert; offsets stay within one
    expert's copy time and start again with another calibration. With ``cpu`` standing in there
    are no events to measure: nothing is learned and the outputs stay exact."""
    engine = fiddler_engine(placement_with(set()), "hybrid")
    executor = engine.model.experts
    executor.adapt_paths = True
    settings = GenerationSettings(max_new_tokens=4)
    assert generate(engine, PROMPT, settings).token_ids == generate(reference, PROMPT, settings).token_ids
    assert (executor.cpu_offset, executor.copy_offset) == (0.0, 0.0)
    executor.adapt_cpu = False
    tokens = {1: 1, 6: 1}
    plan = executor.plan(0, tokens)
    assert plan.split is not None and plan.copies_landed_s > 0
    for _ in range(60):
        executor.learn_path_ends(plan, (0.0, 0.0), plan.cpu_done_s + 3e-4, plan.copies_landed_s + 9e-4)
    assert executor.cpu_offset == pytest.approx(3e-4, rel=1e-3)
    assert executor.copy_offset == pytest.approx(9e-4, rel=1e-3)
    assert executor.planning_corrections[2:] == pytest.approx((3e-4, 9e-4))
    model = executor.planning_model()
    assert (model.cpu_offset_s, model.copy_offset_s) == pytest.approx((3e-4, 9e-4))
    again = executor.plan(0, tokens)
    assert again.split.cpu_blocks > plan.split.cpu_blocks  # copies 0.6 ms later than the CPU: more on the CPU
    for _ in range(60):  # the copies' lateness settles at 0.84 ms, past the edge of the step below: no switch
        executor.learn_path_ends(plan, (0.0, 0.0), plan.cpu_done_s + 3e-4, plan.copies_landed_s + 8.4e-4)
    assert executor.copy_offset == pytest.approx(8.4e-4, rel=1e-3)
    assert executor.planning_corrections[2:] == pytest.approx((3e-4, 9e-4))
    for _ in range(60):
        executor.learn_path_ends(plan, (0.0, 0.0), plan.cpu_done_s - 1.0, plan.copies_landed_s + 1.0)
    assert (executor.cpu_offset, executor.copy_offset) == pytest.approx((-HOST_LIKE.copy, HOST_LIKE.copy))
    executor.use_calibration(HOST_LIKE, make_kernel("torch"))
    assert (executor.cpu_offset, executor.copy_offset) == (0.0, 0.0)
    plain = executor.plan(0, tokens)
    # learned offsets count only while adapt_paths is on; switching it (or the CPU mode) resets them
    executor.learn_path_ends(plan, (0.0, 0.0), plan.cpu_done_s, plan.copies_landed_s + 5e-3)
    assert executor.planning_corrections[2:] != (0.0, 0.0)
    executor._adapt_paths = False
    assert executor.planning_corrections[2:] == (0.0, 0.0)
    assert executor.plan(0, tokens) == plain
    executor.adapt_paths = True
    assert (executor.cpu_offset, executor.copy_offset) == (0.0, 0.0)
    executor.learn_path_ends(plan, (0.0, 0.0), plan.cpu_done_s, plan.copies_landed_s + 5e-3)
    executor.cpu_mode = INLINE
    assert (executor.cpu_offset, executor.copy_offset) == (0.0, 0.0)
    engine.close()


def test_a_sampled_layer_is_measured_at_the_next_and_a_failed_job_is_not(monkeypatch):
    """The measurement of a layer's paths one layer later (CUDA events stubbed: the time from
    the routing read's event to the last copy's landing): offsets move by how late each path
    ended, the sample is used once, and a stream-mode job that failed is skipped (its failure
    was raised where it was taken in), not raised again."""
    from concurrent.futures import Future

    engine = fiddler_engine(placement_with(set()), "hybrid")
    executor = engine.model.experts
    executor.adapt_paths = True
    plan = executor.plan(0, {1: 1, 6: 1})
    landed_s = plan.copies_landed_s + 1e-3
    monkeypatch.setattr(fiddler.orchestrator, "elapsed_ms", lambda start, end: 1e3 * landed_s)
    done: Future = Future()
    done.set_result(fiddler.orchestrator._CpuJob(0.0, 0.0, 0.0, 10.0 + plan.cpu_done_s))
    sample = fiddler.orchestrator._PathSample(None, 10.0, None, done, plan, (0.0, 0.0))
    executor._path_sample = sample
    executor._measure_paths()
    smoothing = fiddler.orchestrator.CPU_FACTOR_SMOOTHING
    assert executor.cpu_offset == pytest.approx(0.0, abs=1e-12)
    assert executor.copy_offset == pytest.approx(smoothing * 1e-3)
    assert executor._path_sample is None
    executor._measure_paths()  # nothing left: no change
    assert executor.copy_offset == pytest.approx(smoothing * 1e-3)
    failed: Future = Future()
    failed.set_exception(RuntimeError("the CPU kernel failed"))
    executor._path_sample = dataclasses.replace(sample, job=failed)
    executor._measure_paths()
    assert executor.copy_offset == pytest.approx(smoothing * 1e-3) and executor._path_sample is None
    engine.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA events")
def test_path_offsets_on_cuda_are_learned_and_keep_outputs(reference):
    engine = Engine.fiddler(
        SOURCE, "cuda", torch.float32, 128, placement_with(set()), HOST_LIKE, "hybrid", make_kernel("torch")
    )
    executor = engine.model.experts
    executor.adapt_paths = True
    settings = GenerationSettings(max_new_tokens=6)
    assert generate(engine, PROMPT, settings).token_ids == generate(reference, PROMPT, settings).token_ids
    # the tiny model's CPU jobs and copies take microseconds against the host-like model's
    # milliseconds: both paths end early (the offsets kept within one expert's copy time)
    assert -HOST_LIKE.copy <= executor.copy_offset < 0 and -HOST_LIKE.copy <= executor.cpu_offset < 0
    engine.close()


def _cpu_time_of(executor, plan, tokens) -> float:
    alone = sum(executor.latency.cpu(tokens[e]) for e in plan.cpu)
    if plan.split:
        alone += executor.latency.cpu_part(tokens[plan.split.expert], plan.split.cpu_fraction)
    return alone


def test_jobs_beside_copies_slower_than_the_curve_raise_only_the_slowdown():
    """A job beside copies that took longer than the curve alone says is the slowdown's to
    explain: the curve's scale stays, so a CPU job alone is still priced as calibrated. One
    that beat the curve lowers the scale one step, and the slowdown explains the rest."""
    engine = fiddler_engine(placement_with(set()), "hybrid")
    executor = engine.model.experts
    tokens = {0: 1, 1: 1}
    plan = executor.plan(0, tokens)
    assert (plan.cpu or plan.split) and (plan.copy or plan.split)
    alone = _cpu_time_of(executor, plan, tokens)
    executor.cpu_slowdown = 1.0
    executor._learn_cpu_factor(plan, tokens, 2.0 * alone)
    assert executor.cpu_factor == 1.0
    assert executor.cpu_slowdown == pytest.approx(1.2)  # one step of 0.2 toward 2
    executor._learn_cpu_factor(plan, tokens, 0.5 * alone)  # then one that beat the curve
    assert executor.cpu_factor == pytest.approx(0.9)  # one step toward 0.5
    # the slowdown moves toward what the lowered curve leaves unexplained (0.5 / 0.9), so the
    # two together step toward the measurement once, not twice
    assert executor.cpu_slowdown == pytest.approx(0.8 * 1.2 + 0.2 * 0.5 / 0.9)
    engine.close()


def test_noise_around_an_exact_calibration_leaves_the_curve_near_it():
    """Under hybrid every job has copies beside it, and a job only bounds the curve from above:
    noise alone must not drag the scale down job after job (a scale below 1 moves back toward
    the bound capped at 1)."""
    engine = fiddler_engine(placement_with(set()), "hybrid")
    executor = engine.model.experts
    tokens = {0: 1, 1: 1}
    plan = executor.plan(0, tokens)
    alone = _cpu_time_of(executor, plan, tokens)
    executor.cpu_slowdown = 1.0
    rng = random.Random(3)
    for _ in range(2000):  # the CPU exactly as calibrated, 10% jitter either way
        executor._learn_cpu_factor(plan, tokens, alone * rng.lognormvariate(0.0, 0.1))
    assert 0.9 <= executor.cpu_factor <= 1.0
    assert executor.cpu_factor * executor.cpu_slowdown == pytest.approx(1.0, abs=0.1)
    engine.close()


def test_a_divided_expert_of_many_tokens_does_not_bound_the_curve():
    """The share curve is measured at one token and prices a part of a many-token expert high:
    a job holding such a part may beat its price without the curve being slow."""
    engine = fiddler_engine(placement_with(set()), "hybrid")
    executor = engine.model.experts
    plan = LayerPlan((), (), (), 0.0, Split(0, 1, 2))
    tokens = {0: 8}
    executor._learn_cpu_factor(plan, tokens, 0.5 * _cpu_time_of(executor, plan, tokens))
    assert executor.cpu_factor == 1.0
    engine.close()


@pytest.mark.parametrize("kernel_name", ["avx512-bf16", "amx-bf16"])
def test_native_cpu_kernel_inside_the_executor(kernel_name):
    """bf16 end to end with a native kernel on the CPU path, in the executor's worker thread
    (where it builds and the CPU has its instructions)."""
    from fiddler.native import amx_unavailable_reason, native_unavailable_reason

    reason = native_unavailable_reason() if kernel_name == "avx512-bf16" else amx_unavailable_reason()
    if reason is not None:
        pytest.skip(f"{kernel_name} unavailable here: {reason}")
    placement = placement_with({(0, 0)})
    engine = Engine.fiddler(
        SOURCE, "cpu", torch.bfloat16, 128, placement, HOST_LIKE, "cpu-experts", make_kernel(kernel_name)
    )
    reference = Engine.resident(SOURCE, "cpu", torch.bfloat16, 128)
    for e in (engine, reference):
        e.begin(1, len(PROMPT) + 1)
    got, want = engine.prefill(torch.tensor(PROMPT))[0], reference.prefill(torch.tensor(PROMPT))[0]
    assert float((got - want).norm() / want.norm()) < 0.05
    got, want = engine.decode(torch.tensor([5]))[0], reference.decode(torch.tensor([5]))[0]
    assert float((got - want).norm() / want.norm()) < 0.05
    assert engine.stats()["cpu_kernel"] == kernel_name and engine.stats()["experts_cpu"] > 0
    engine.close()


@pytest.mark.parametrize("policy", ["hybrid", "copy-experts"])
def test_piecewise_decode_plumbing_matches(reference, policy):
    """Decode split into per-layer segments around the executor (what CUDA graphs record on a
    GPU), run eagerly here: same tokens, greedy and beams, as the plain decode."""
    placement = random_placement(random.Random(9))
    engine = Engine.fiddler(
        SOURCE, "cpu", torch.float32, 128, placement, HOST_LIKE, policy, make_kernel("torch"), piecewise=True
    )
    assert engine.piecewise and engine.stats()["cuda_graphs"] == "piecewise"
    for settings in (GenerationSettings(max_new_tokens=8), GenerationSettings(max_new_tokens=5, beam_width=3)):
        assert generate(engine, PROMPT, settings).token_ids == generate(reference, PROMPT, settings).token_ids
    stats = generate(engine, PROMPT, GenerationSettings(max_new_tokens=6)).stats
    assert stats["layers"] == CONFIG.num_layers * 6  # every layer's experts ran once per forward pass
    engine.close()
