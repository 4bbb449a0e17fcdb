"""The benchmark command: its parsing helpers, and an end-to-end smoke run that writes well-formed results.

No assertion is made on any timing: the smoke figures mean nothing, only their shape is checked.
"""

from __future__ import annotations

import datetime
import json
import math
import time
from pathlib import Path

import pytest
import torch

from benchmarks.federated import described_bytes, fit_scaling, memory_by_round, memory_growth
from benchmarks.simlog import overhead_summary, read_round_timeline
from benchmarks.system import Sample, simulator_roles
from fedbrats.federated.events import RoundEventWriter

# The sites' own events: (site, end clock time, seconds of work, round, steps).
SITE_WORK = [
    ("site-1", "10:00:05.000", 2.0, 0, 3),
    ("site-2", "10:00:05.500", 2.5, 0, 3),
    ("site-1", "10:00:08.200", 1.0, 1, 3),
]


def _at(clock: str) -> float:
    """``time.time()`` of a clock time of the log's day (the log's time stamps are local time)."""
    return datetime.datetime.strptime(f"2026-01-01 {clock}", "%Y-%m-%d %H:%M:%S.%f").timestamp()


# The controller's events of the same run (only the timing-relevant items).
EVENTS = [
    ("10:00:00.000", "run_start", None, {"num_rounds": 2}),
    ("10:00:01.000", "round_start", 0, {}),
    ("10:00:06.000", "results_collected", 0, {"task": "train"}),
    ("10:00:06.200", "round_end", 0, {"seconds": 5.2}),
    ("10:00:06.200", "round_start", 1, {}),
    ("10:00:08.700", "results_collected", 1, {"task": "train"}),
    ("10:00:09.200", "round_end", 1, {"seconds": 3.0}),
    ("10:00:09.300", "final_validation", 2, {}),
    ("10:00:09.800", "results_collected", 2, {"task": "validate"}),
    ("10:00:10.300", "run_end", 2, {"num_rounds": 2}),
]


def _write_events(path: Path) -> None:
    writer_clock = iter(_at(clock) for clock, *_ in EVENTS)
    writer = RoundEventWriter(str(path), clock=lambda: next(writer_clock))
    for _, event, current_round, fields in EVENTS:
        writer.write(event, current_round, **fields)


def _write_site_events(folder: Path) -> list[str]:
    """Each site's ``site_events.jsonl`` as its training script writes it."""
    paths = []
    for site in sorted({s for s, *_ in SITE_WORK}):
        rows = [row for row in SITE_WORK if row[0] == site]
        clock = iter(_at(end) for _, end, *_ in rows)
        path = folder / f"{site}.jsonl"
        writer = RoundEventWriter(str(path), clock=clock.__next__)
        for _, end, seconds, current_round, steps in rows:
            started = _at(end) - seconds
            writer.write("site_work", current_round, site=site, started=started, seconds=seconds, steps=steps)
        paths.append(str(path))
    return paths


def test_round_events_and_site_events_give_the_round_breakdown(tmp_path: Path) -> None:
    events = tmp_path / "round_events.jsonl"
    _write_events(events)
    tl = read_round_timeline(str(events), _write_site_events(tmp_path))
    assert sorted(tl.rounds) == [0, 1]
    assert tl.finished - tl.final_validation == pytest.approx(1.0)
    b = tl.rounds[1].breakdown()
    assert b["wall"] == pytest.approx(3.0)
    assert b["dispatch"] == pytest.approx(1.0)  # sent 06.2, site-1 started 08.2 - 1.0 = 07.2
    assert b["site_work_max"] == pytest.approx(1.0)
    assert b["return"] == pytest.approx(0.5)
    assert b["aggregate"] == pytest.approx(0.5)
    assert tl.rounds[0].site_steps == {"site-1": 3, "site-2": 3}
    assert tl.workflow_start == pytest.approx(_at("10:00:00.000"))


def test_overhead_summary_is_the_median_over_complete_rounds(tmp_path: Path) -> None:
    events = tmp_path / "round_events.jsonl"
    _write_events(events)
    summary = overhead_summary(read_round_timeline(str(events), _write_site_events(tmp_path)))
    # Round 0: wall 5.2, sites 03.0-05.5 (span 2.5), NVFlare 2.0 + 0.5 + 0.2; round 1: 3.0, 1.0, 1.0 + 0.5 + 0.5.
    assert summary["rounds"] == 2
    assert summary["wall_s"] == pytest.approx(4.1) and summary["sites_span_s"] == pytest.approx(1.75)
    assert summary["nvflare_s"] == pytest.approx(2.35) and summary["ratio"] == pytest.approx((5.2 / 2.5 + 3.0) / 2)
    assert overhead_summary(read_round_timeline(str(events))) is None


def test_round_timeline_without_the_site_events_has_no_breakdown(tmp_path: Path) -> None:
    """The server's events alone give the round windows; the breakdown needs the sites' own work."""
    events = tmp_path / "round_events.jsonl"
    _write_events(events)
    tl = read_round_timeline(str(events))
    assert tl.rounds[0].done - tl.rounds[0].sent == pytest.approx(5.2)
    assert tl.rounds[1].breakdown() is None


def test_payload_bytes_and_scaling_fit() -> None:
    desc = {"type": "dict", "items": {"w": {"type": "ndarray", "shape": [2, 3], "dtype": "float32"}}}
    assert described_bytes(desc) == 24
    assert described_bytes({"type": "Tensor", "shape": [4], "dtype": "torch.float16"}) == 8
    assert described_bytes({"type": "int", "value": 3}) == 8
    assert described_bytes({"type": "str", "length": 5}) == 5
    fit = fit_scaling([2, 4, 8, 16], [12.0, 14.0, 18.0, 26.0])  # a fixed part plus one per site
    assert fit["verdict"] == "linear" and fit["exponent"] == pytest.approx(1.0, abs=0.05)
    assert fit["linear"]["slope"] == pytest.approx(1.0)
    assert fit_scaling([2, 4, 8, 16], [5.0 + n**0.5 for n in (2, 4, 8, 16)])["verdict"] == "sublinear"
    assert fit_scaling([2, 4, 8, 16], [5.0 + n**2 for n in (2, 4, 8, 16)])["verdict"] == "superlinear"
    assert fit_scaling([2, 4], [1.0, 2.0])["exponent"] is None
    assert fit_scaling([2], [1.0]) is None


def test_memory_peaks_per_round_and_growth() -> None:
    series = {"server": [(0.5, 100), (1.5, 200), (2.5, 210), (3.5, 205), (4.5, 214)]}
    windows = {0: (0.0, 1.0), 1: (1.0, 2.0), 2: (2.0, 3.0), 3: (3.0, 5.0)}
    mem = memory_by_round(series, windows)["server"]
    assert mem["peak_bytes"] == 214
    assert mem["per_round_peak_bytes"] == {0: 100, 1: 200, 2: 210, 3: 214}
    assert mem["growth"]["from_round"] == 2 and mem["growth"]["to_round"] == 3, "after round 2"
    assert mem["growth"]["fraction"] == pytest.approx(4 / 210)
    three = memory_by_round(series, {0: (0.0, 1.0), 1: (1.0, 2.0), 2: (2.0, 3.0)})["server"]["growth"]
    assert three["from_round"] == 1 and three["fraction"] == pytest.approx(0.05)
    assert memory_by_round(series, {0: (0.0, 1.0), 1: (1.0, 2.0)})["server"]["growth"] is None
    # Eight rounds or more: medians of rounds 2-4 and of the last three, so one spike does not decide.
    peaks = {0: 50, 1: 90, 2: 100, 3: 101, 4: 99, 5: 102, 6: 101, 7: 180, 8: 102, 9: 103}
    long = memory_growth(peaks)
    assert long["from_rounds"] == [2, 3, 4] and long["to_rounds"] == [7, 8, 9]
    assert long["fraction"] == pytest.approx(0.03)


def test_simulator_process_roles() -> None:
    samples = [
        Sample(0, 10, 1, 1, "python -m nvflare.cli simulator job -w ws"),
        Sample(0, 11, 10, 1, "python -m nvflare.cli simulator job -w ws"),
        Sample(0, 12, 10, 1, "python -m nvflare.cli simulator job -w ws"),
        Sample(0, 13, 12, 1, "python -m nvflare.private.fed.app.simulator.simulator_worker -o x --client site-2"),
    ]
    assert simulator_roles(samples) == {10: "launcher", 11: "manager", 12: "server", 13: "client:site-2"}
    # A client first read between fork and exec (its parent's command line) is still named by its worker line.
    early = Sample(0, 14, 12, 1, "python -m nvflare.cli simulator job -w ws")
    worker = Sample(1, 14, 12, 1, "python -m nvflare.private.fed.app.simulator.simulator_worker --client site-8")
    assert simulator_roles([*samples, early, worker])[14] == "client:site-8"
    assert simulator_roles([*samples, worker, early])[14] == "client:site-8"


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


@pytest.mark.integration
def test_smoke_benchmark_writes_results(tmp_path: Path) -> None:
    """``benchmarks/run.py --smoke``: every section runs and writes well-formed JSON, markdown and PNGs."""
    from benchmarks.compute import NO_GPU
    from benchmarks.main import main

    out = tmp_path / "results"
    argv = ["--smoke", "--out-dir", str(out), "--work-dir", str(tmp_path / "work"), "--log-level", "WARNING"]
    assert main(argv) == 0

    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    machine = results["machine"]
    assert machine["cpu_model"] and machine["logical_cores"] >= 1 and machine["ram_gib"] > 0
    assert {"python", "torch", "monai", "nvflare", "numpy"} <= set(machine["versions"])
    assert results["command"].startswith("python benchmarks/run.py") and "--smoke" in results["command"]
    assert set(results["section_seconds"]) == {"federated", "throughput", "inference", "scale"}

    for job in ("fedavg", "fedkd"):
        entry = results["federated"][job]
        fed, local, overhead = entry["federated"], entry["local"], entry["overhead"]
        assert sorted(fed["round_seconds"]) == ["0", "1"] and sorted(local["round_seconds"]) == ["0", "1"]
        assert _finite(overhead["round_ratio"]) and overhead["round_ratio"] > 0
        assert _finite(overhead["job_startup_seconds"])
        assert fed["mean_breakdown"] and _finite(fed["mean_breakdown"]["dispatch"])
        memory = fed["memory"]
        # Sampling every 0.5 s can miss a site process of a run this short; the server and a site are always seen.
        clients = [k for k in memory if k.startswith("client:site-")]
        assert "server" in memory and clients, f"processes sampled: {sorted(memory)}"
        assert all(memory[k]["peak_bytes"] > 0 for k in ("server", *clients))
        comm = fed["communication"]
        assert comm["model"]["bytes"] > 0
        for site in ("site-1", "site-2"):
            assert comm["sites"][site]["received_x_model"] >= 1.0
            assert comm["sites"][site]["absent_sequence_weights_per_round"] == 0
        assert comm["sites"]["site-1"]["sent_x_model"] >= 1.0, "a site with all four sequences sends the whole model"
        if job == "fedkd":  # site-2 lacks T1ce: its FedKD update leaves that encoder out
            assert comm["sites"]["site-2"]["sent_x_model"] < 1.0
        throughput = results["throughput"][job]
        assert all(r["cases_per_second"] > 0 for r in throughput["one_thread"].values())
        if not torch.cuda.is_available():
            assert throughput["gpu"] == {"measured": False, "reason": NO_GPU}
        scale_rows = results["scale"][job]["rows"]
        assert [r["sites"] for r in scale_rows] == [2] and scale_rows[0]["server_peak_bytes"] > 0
    fedkd_comm = results["federated"]["fedkd"]["federated"]["communication"]
    assert fedkd_comm["server_state_bytes"] > 0, "FedKD's global prototypes should be part of what sites receive"

    rows = results["inference"]["rows"]
    assert {(r["job"], r["num_sequences"]) for r in rows} == {("fedavg", 4), ("fedavg", 1), ("fedkd", 4), ("fedkd", 1)}
    assert all(r["seconds"] > 0 for r in rows)

    report = (out / "report.md").read_text(encoding="utf-8")
    for heading in ("## Machine and settings", "## 1. Federated overhead", "## 2. Training throughput",
                    "## 3. Memory", "## 4. Communication", "## 5. Inference", "## 6. Scale"):  # fmt: skip
        assert heading in report
    if not torch.cuda.is_available():
        assert NO_GPU in report
    for name in ("overhead", "memory", "communication", "throughput", "inference", "scale"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png} is not a PNG"
        assert f"]({name}.png)" in report

    # --report-only rewrites the report from the saved readings, measuring nothing.
    (out / "report.md").unlink()
    assert main(["--report-only", "--out-dir", str(out), "--log-level", "WARNING"]) == 0
    assert "## 3. Memory" in (out / "report.md").read_text(encoding="utf-8")
    with pytest.raises(ValueError, match="results.json does not exist"):
        main(["--report-only", "--out-dir", str(tmp_path / "empty")])


def test_other_work_does_not_count_the_benchmarks_own_processes() -> None:
    """The benchmark's own CPU time (its reaped children included) is not other work; the rest of the machine's is.

    Controlled clocks, not the live machine: the result must not depend on what else runs meanwhile.
    """
    from benchmarks.system import OtherWork

    clock = {"busy": 100.0, "own": 10.0, "wall": 50.0}
    other = OtherWork(lambda: clock["busy"], lambda: clock["own"], lambda: clock["wall"])
    # 2 s of wall time: the benchmark and its children used 3 CPU seconds, and the machine 3 in all
    clock.update(busy=103.0, own=13.0, wall=52.0)
    assert other.cores() == 0.0, "the benchmark's own CPU time was counted as other work"
    # another program adds 2 CPU seconds over the same 2 s: one core of other work
    clock.update(busy=105.0)
    assert other.cores() == 1.0
    # more own time than the machine counted (sampling skew) is never negative
    clock.update(own=20.0)
    assert other.cores() == 0.0


def test_own_cpu_seconds_count_reaped_children() -> None:
    """What OtherWork subtracts includes a finished child's CPU time (the real counters, no idleness assumed)."""
    import subprocess
    import sys

    from benchmarks.system import _own_cpu_seconds

    before = _own_cpu_seconds()
    subprocess.run(
        [sys.executable, "-c", "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass"]
    )
    assert _own_cpu_seconds() - before >= 0.45


def test_prepared_federation_options(tmp_path: Path) -> None:
    """--sites-file, --rounds and --set reach the settings; a missing federation or too few rounds are refused by
    name before anything runs."""
    from benchmarks.main import BenchSettings, main

    settings = BenchSettings(mode="smoke", epochs_per_round=2, training={"data": {"zoom": 0.5}, "num_threads": 1})
    assert settings.overrides() == {"epochs_per_round": 2, "data": {"zoom": 0.5}, "num_threads": 1}
    with pytest.raises(ValueError, match="--sites-file"):
        main(["--smoke", "--sections", "federated", "--out-dir", str(tmp_path), "--sites-file", str(tmp_path / "no")])
    with pytest.raises(SystemExit, match="--rounds"):
        main(["--smoke", "--out-dir", str(tmp_path), "--rounds", "1"])


def test_wire_curve_pairs_each_configuration_with_its_reference() -> None:
    from benchmarks.wire import curve_report, reference_pair

    pair = {"mean_difference": -0.013, "ci95": [-0.02, -0.006]}
    paired = {"fedavg_svd vs fedavg": {"mean_difference": 0.002, "ci95": [-0.004, 0.006]}, "fedkd_svd vs fedkd": pair}
    assert reference_pair(paired, "fedavg_svd", "fedavg")[0] == "fedavg"
    assert reference_pair(paired, "fedkd_svd", "fedavg") == ("fedkd", pair), "its own uncompressed run"
    assert reference_pair(paired, "fedavg", "fedavg") == (None, None)
    measured = {
        name: {
            0: {
                "dense_model_bytes": 1000,
                "sent_mean": sent,
                "received_mean": 2 * sent,
                "received_later_mean": sent / 2,
            }
        }
        for name, sent in (("fedavg", 1000.0), ("fedkd_svd", 100.0))
    }
    dice = {"mean_over_combinations": {"mean_dice": {"mean": 0.7, "std": 0.01}}}
    report = curve_report(measured, {"methods": {"fedkd_svd": dice}, "paired": paired}, "fedavg", "cmd")
    row = next(line for line in report.splitlines() if line.startswith("| fedkd_svd"))
    assert row.split(" | ")[1:] == [
        "1",
        "100",
        "10.0",
        "200",
        "5.0",
        "50",
        "20.0",
        "0.700 ± 0.010",
        "fedkd",
        "-0.013",
        "[-0.020, -0.006] |",
    ]


def test_process_sampler_keeps_reading_a_process_whose_parent_exited() -> None:
    """A grandchild whose parent exits is re-parented outside the tree; it is still read until it ends."""
    import subprocess
    import sys

    from benchmarks.system import ProcessSampler

    grandchild = "import time; time.sleep(4)"
    child = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {grandchild!r}]); time.sleep(1)"
    proc = subprocess.Popen([sys.executable, "-c", child])
    with ProcessSampler(interval=0.1) as sampler:
        proc.wait()
        exited = time.time()
        time.sleep(1.5)
    pids = {s.pid for s in sampler.samples if s.ppid == proc.pid}
    assert pids, "the grandchild was never seen in the tree"
    assert any(s.pid in pids and s.t > exited + 0.5 for s in sampler.samples)


def test_distill_step_benchmark_reports_each_site(tmp_path: Path) -> None:
    """benchmarks/distill_step.py times both ways at each kind of site and writes its report (sizes tiny here)."""
    from benchmarks.distill_step import main as distill_step

    assert distill_step(["--out-dir", str(tmp_path), "--roi", "16", "--steps", "1", "--precision", "fp32"]) == 0
    with open(tmp_path / "results.json", encoding="utf-8") as f:
        report = json.load(f)
    assert set(report["sites"]) == {"all four", "no T1ce", "T2 + FLAIR"}
    for site in report["sites"].values():
        assert set(site["seconds_per_step"]) == {"student view only", "two views"}
        assert site["ratio"] > 0 and all(v > 0 for v in site["seconds_per_step"].values())
    assert "| all four |" in (tmp_path / "report.md").read_text(encoding="utf-8")
