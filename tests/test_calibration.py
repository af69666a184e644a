import json

import pytest
import torch

from fiddler.build import EngineOptions, build_engine
from fiddler.calibrate import SCHEMA, calibrate, calibration_matches, load_calibration, save_calibration
from fiddler.config import ModelConfig
from fiddler.cost_model import LatencyModel
from fiddler.steadiness import recorded_problems, steadiness_problems

TINY = ModelConfig.preset("mixtral-tiny")


@pytest.fixture(scope="module")
def tiny_calibration():
    return calibrate(TINY, "cpu", torch.float32, token_counts=(1, 4, 16), repeats=2)


def test_calibration_schema(tiny_calibration, tmp_path):
    c = tiny_calibration
    assert c["schema"] == SCHEMA and c["version"] == 1 and c["device"] == "cpu"
    assert c["model"]["hidden_size"] == TINY.hidden_size and c["cpu_kernel"] == "torch"  # float32: torch only
    assert set(c["cpu_kernel_curves_s"]) == {"torch"} and c["cpu_kernel_tiers"] == [[None, "torch"]]
    for key in ("cpu_expert_s", "gpu_expert_s", "act_d2h_s", "act_h2d_s", "cpu_weight_gb_per_s"):
        assert len(c[key]) == 3 and all(v > 0 for v in c[key]), key
    assert c["copy_expert_s"] > 0 and c["concurrent"]["measured"] is False
    assert "cpu_cores" in c["machine"]
    path = tmp_path / "cal.json"
    save_calibration(c, path)
    assert load_calibration(path) == json.loads(json.dumps(c))
    assert not list(tmp_path.glob("*.tmp"))
    model = LatencyModel.from_calibration(load_calibration(path))
    assert model.cpu(4) == c["cpu_expert_s"][1]


def test_bf16_calibration_measures_every_kernel_here_and_builds_its_choice(tmp_path):
    from fiddler.cpu_experts import available_kernels

    c = calibrate(TINY, "cpu", torch.bfloat16, token_counts=(1, 4, 32), repeats=2)
    assert set(c["cpu_kernel_curves_s"]) == set(available_kernels())
    if "avx512-bf16" in c["cpu_kernel_curves_s"]:  # it computes at most 16 tokens itself
        assert c["cpu_kernel_curves_s"]["avx512-bf16"][2] is None
    tiers = c["cpu_kernel_tiers"]
    assert tiers[-1][0] is None and all(name in c["cpu_kernel_curves_s"] for _, name in tiers)
    fastest = [min(v[i] for v in c["cpu_kernel_curves_s"].values() if v[i] is not None) for i in range(3)]
    assert c["cpu_expert_s"] == fastest
    path = tmp_path / "cal.json"
    save_calibration(c, path)
    engine, record = build_engine(
        EngineOptions(
            TINY, 64, device="cpu", dtype=torch.bfloat16, gpu_memory_gb=0.2, policy="hybrid", calibration=path
        )
    )
    assert record["calibration"]["cpu_kernel"] == c["cpu_kernel"] == engine.model.experts.cpu_kernel.name
    engine.close()


def test_calibration_must_fit_the_model(tiny_calibration, tmp_path):
    assert calibration_matches(tiny_calibration, TINY, torch.float32) is None
    assert "hidden_size" in calibration_matches(tiny_calibration, ModelConfig.preset("mixtral-small"), torch.float32)
    path = tmp_path / "cal.json"
    save_calibration(tiny_calibration, path)
    options = EngineOptions(
        config=ModelConfig.preset("mixtral-small"),
        device="cpu",
        dtype=torch.float32,
        max_seq_len=32,
        gpu_memory_gb=0.2,
        policy="hybrid",
        calibration=path,
    )
    with pytest.raises(ValueError, match="another expert shape"):
        build_engine(options)


def test_bad_calibration_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="fiddler calibrate"):
        load_calibration(tmp_path / "none.json")
    (tmp_path / "x.json").write_text('{"schema": "other"}')
    with pytest.raises(ValueError, match="not a fiddler calibration"):
        load_calibration(tmp_path / "x.json")


def test_result_files_are_written_atomically(tmp_path):
    from fiddler.files import write_json_atomic

    class Unprintable:
        def __str__(self):
            raise OSError("No space left on device")  # what a full disk looks like mid-write

    path = tmp_path / "out" / "result.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(OSError, match="No space left"):
        write_json_atomic(path, {"a": Unprintable()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]


def test_a_kernel_asked_for_by_name_is_kept_and_torch_covers_beyond_its_limit(tmp_path):
    from fiddler.native import native_unavailable_reason

    if native_unavailable_reason() is not None:
        pytest.skip(f"native kernel unavailable here: {native_unavailable_reason()}")
    c = calibrate(TINY, "cpu", torch.bfloat16, cpu_kernel="avx512-bf16", token_counts=(1, 32), repeats=2)
    assert c["cpu_kernel_tiers"] == [[1, "avx512-bf16"], [None, "torch"]]
    assert c["cpu_kernel_curves_s"]["torch"][0] is None and c["cpu_kernel_curves_s"]["torch"][1] > 0
    path = tmp_path / "cal.json"
    save_calibration(c, path)
    for wanted, accepted in (("avx512-bf16", True), ("auto", True), ("torch", False), ("amx-bf16", False)):
        options = EngineOptions(
            TINY, 64, dtype=torch.bfloat16, gpu_memory_gb=0.2, policy="hybrid", calibration=path, cpu_kernel=wanted
        )
        if accepted:
            build_engine(options)[0].close()
        else:
            with pytest.raises(ValueError, match="measured with the"):
                build_engine(options)


def _measured(cpu_s: list[float], busy: float = 0.0) -> dict[str, object]:
    return {"token_counts": [1, 4, 16], "cpu_expert_s": cpu_s, "host_load": {"other_busy_cores": busy}}


class _Loads:
    """Stands for HostLoad: each measurement window reads the next of the given loads."""

    def __init__(self, loads: list[float]):
        self.loads = iter(loads)

    def __call__(self):
        return self

    def __enter__(self):
        self.load = next(self.loads)
        return self

    def __exit__(self, *exc):
        pass

    def summary(self):
        return {"other_busy_cores": self.load}


def test_steadiness_problems_name_a_busy_host_and_a_curve_out_of_order():
    big = 352 * 2**20  # an expert streamed from memory
    assert steadiness_problems(_measured([3.1e-3, 3.2e-3, 4.0e-3]), big) == []
    assert steadiness_problems(_measured([3.3e-3, 3.1e-3, 4.0e-3]), big) == []  # within the tolerance
    out_of_order = steadiness_problems(_measured([8.35e-3, 6.65e-3, 9.0e-3]), big)
    assert len(out_of_order) == 1 and "8.35 ms for 1 token(s) but 6.65 ms for 4" in out_of_order[0]
    busy = steadiness_problems(_measured([3.1e-3, 3.2e-3, 4.0e-3], busy=1.5), big)
    assert len(busy) == 1 and "other processes kept 1.50 cores busy" in busy[0]
    # a small expert's times are call overheads: their order says nothing about the host
    assert steadiness_problems(_measured([8.35e-3, 6.65e-3, 9.0e-3]), 2**20) == []


def test_a_disturbed_calibration_is_measured_again_and_the_least_disturbed_kept(monkeypatch):
    import fiddler.calibrate as cal
    import fiddler.steadiness

    monkeypatch.setattr(fiddler.steadiness, "CURVE_CHECK_MIN_BYTES", 0)  # the tiny model's expert counts as streamed
    out_of_order, steady = [8.0e-3, 6.0e-3, 9.0e-3], [3.1e-3, 3.2e-3, 4.0e-3]
    curves = iter([out_of_order, steady])
    monkeypatch.setattr(
        cal, "_measure", lambda *args: {"token_counts": [1, 4, 16], "cpu_expert_s": next(curves), "copy_expert_s": 1e-3}
    )
    monkeypatch.setattr(cal, "HostLoad", _Loads([0.0, 0.0]))
    c = calibrate(TINY, "cpu", torch.float32, token_counts=(1, 4, 16))
    assert c["steadiness"] == {"attempt": 2, "attempts": 2, "problems": [], "host_load_known": True}
    assert c["cpu_expert_s"] == steady and c["host_load"] == {"other_busy_cores": 0.0}

    # every attempt disturbed: the one with fewest problems is kept, and says so
    curves = iter([[9.0e-3, 6.0e-3, 9.5e-3], [7.0e-3, 5.0e-3, 9.0e-3]])
    monkeypatch.setattr(cal, "HostLoad", _Loads([0.0, 2.0]))  # the second also on a busy host
    c = calibrate(TINY, "cpu", torch.float32, token_counts=(1, 4, 16), attempts=2)
    assert c["steadiness"]["attempt"] == 1 and c["steadiness"]["attempts"] == 2
    assert len(c["steadiness"]["problems"]) == 1 and recorded_problems(c) == c["steadiness"]["problems"]
    with pytest.raises(ValueError, match="at least 1"):
        calibrate(TINY, "cpu", torch.float32, attempts=0)


def test_an_engine_on_a_disturbed_calibration_warns_and_records_it(tiny_calibration, tmp_path, caplog):
    disturbed = dict(
        tiny_calibration, steadiness={"attempt": 3, "attempts": 3, "problems": ["other processes kept 2 cores busy"]}
    )
    path = tmp_path / "cal.json"
    save_calibration(disturbed, path)
    engine, record = build_engine(
        EngineOptions(TINY, 64, device="cpu", dtype=torch.float32, gpu_memory_gb=0.2, policy="hybrid", calibration=path)
    )
    engine.close()
    assert record["calibration"]["disturbed"] == ["other processes kept 2 cores busy"]
    assert "disturbed host" in caplog.text
    # files from before the steadiness keys are judged by their curve
    older = {k: v for k, v in tiny_calibration.items() if k != "steadiness"}
    older |= {"model": older["model"] | {"expert_bytes": 352 * 2**20}, "cpu_expert_s": [8.35e-3, 6.65e-3, 9e-3]}
    assert len(recorded_problems(older)) == 1
