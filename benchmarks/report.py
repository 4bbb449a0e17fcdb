"""``report.md`` and PNG plots from a benchmark's ``results.json`` content."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from benchmarks.compute import NO_GPU

logger = logging.getLogger(f"fedbrats.{__name__}")

OVERHEAD_TARGET = 1.10
MEMORY_GROWTH_TARGET = 0.02
MIB = 2**20


def _s(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / MIB:.1f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.2f} %"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _int_keys(d: Mapping[Any, Any]) -> dict[int, Any]:
    return {int(k): v for k, v in d.items()}


# ---- plots -------------------------------------------------------------------------------------------------


def _plot(out_dir: str, name: str, draw: Callable[[Any], None], figsize: tuple[float, float]) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=figsize)
        draw(fig)
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return name
    except Exception as exc:  # a plot must never cost the report
        logger.warning("plot %s failed: %s", name, exc)
        return None


def _plot_overhead(fed: Mapping[str, Any]) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        jobs = list(fed)
        for i, job in enumerate(jobs):
            ax = fig.add_subplot(1, len(jobs), i + 1)
            f = _int_keys(fed[job]["federated"]["round_seconds"])
            loc = _int_keys(fed[job]["local"]["round_seconds"])
            rounds = sorted(f)
            x = np.arange(len(rounds))
            parts: dict[str, list[float]] = {
                "dispatch": [],
                "longest site work": [],
                "sites not overlapping": [],
                "return": [],
                "aggregate": [],
            }
            bd = _int_keys(fed[job]["federated"]["breakdown"])
            for r in rounds:
                b = bd.get(r) or {}
                parts["dispatch"].append(b.get("dispatch", 0.0))
                parts["longest site work"].append(b.get("site_work_max", 0.0))
                parts["sites not overlapping"].append(max(b.get("sites_span", 0.0) - b.get("site_work_max", 0.0), 0.0))
                parts["return"].append(b.get("return", 0.0))
                parts["aggregate"].append(b.get("aggregate", 0.0))
            bottom = np.zeros(len(rounds))
            for k, vals in parts.items():
                ax.bar(x - 0.2, vals, 0.4, bottom=bottom, label=f"simulator: {k}")
                bottom += np.array(vals)
            ax.bar(x + 0.2, [loc.get(r, 0.0) for r in rounds], 0.4, color="grey", label="without NVFlare")
            ax.plot(x - 0.2, [f[r] for r in rounds], "k_", markersize=20, label="simulator round (metrics.json)")
            ax.set_xticks(x, [str(r) for r in rounds])
            ax.set_xlabel("round")
            ax.set_ylabel("seconds")
            ax.set_title(f"{job}: round wall time")
            if i == 0:
                ax.legend(fontsize=7)

    return draw


def _plot_memory(fed: Mapping[str, Any]) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        jobs = list(fed)
        for i, job in enumerate(jobs):
            ax = fig.add_subplot(1, len(jobs), i + 1)
            run = fed[job]["federated"]
            for label, points in sorted(run.get("memory_series", {}).items()):
                if label in ("launcher", "manager"):
                    continue
                if not points:
                    continue
                t, rss = zip(*points)
                ax.plot(t, np.array(rss) / MIB, label=label, linewidth=1)
            for r, (s, e) in _int_keys(run.get("round_windows", {})).items():
                ax.axvspan(s, e, alpha=0.08 if r % 2 else 0.16, color="tab:blue")
            ax.set_xlabel("seconds since the simulator started (shaded: rounds)")
            ax.set_ylabel("RSS (MiB)")
            ax.set_title(f"{job}: memory per process")
            ax.legend(fontsize=7)

    return draw


def _plot_communication(fed: Mapping[str, Any]) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        jobs = list(fed)
        for i, job in enumerate(jobs):
            ax = fig.add_subplot(1, len(jobs), i + 1)
            comm = fed[job]["federated"]["communication"]
            sites = sorted(comm["sites"])
            x = np.arange(len(sites))
            ax.bar(x - 0.2, [comm["sites"][s]["sent_per_round"] / MIB for s in sites], 0.4, label="sent")
            ax.bar(x + 0.2, [comm["sites"][s]["received_per_round"] / MIB for s in sites], 0.4, label="received")
            ax.axhline(comm["model"]["bytes"] / MIB, color="k", linestyle="--", linewidth=1, label="model size")
            ax.set_xticks(x, sites)
            ax.set_ylabel("MiB per round")
            ax.set_title(f"{job}: payload per site and round")
            ax.legend(fontsize=7)

    return draw


def _plot_throughput(tp: Mapping[str, Any]) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        jobs = list(tp)
        sites = sorted({s for j in jobs for s in tp[j]["one_thread"]})
        x = np.arange(len(sites))
        width = 0.8 / max(len(jobs), 1)
        for i, job in enumerate(jobs):
            vals = [tp[job]["one_thread"].get(s, {}).get("cases_per_second") or 0.0 for s in sites]
            ax.bar(x + (i - (len(jobs) - 1) / 2) * width, vals, width, label=job)
        labels = [f"{s}\n{'+'.join(tp[jobs[0]]['one_thread'].get(s, {}).get('modalities', []))}" for s in sites]
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_ylabel("training cases/s (1 thread, CPU)")
        ax.set_title("training throughput per site")
        ax.legend()

    return draw


def _plot_inference(rows: Sequence[Mapping[str, Any]]) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        labels = [
            f"{r['job']} {r['subset']}\nroi {r['roi_size'][0]} zoom {r['zoom']:g} {r.get('precision', 'fp32')}".replace(
                "t1+t1ce+t2+flair", "all 4"
            )
            for r in rows
        ]
        ax.barh(np.arange(len(rows)), [r["seconds"] for r in rows])
        ax.set_yticks(np.arange(len(rows)), labels, fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel("seconds per case (CPU)")
        ax.set_title("inference of one full-size case")

    return draw


def _plot_scale(scale: Mapping[str, Any]) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        ax1 = fig.add_subplot(1, 2, 1)
        ax2 = fig.add_subplot(1, 2, 2)
        for i, (job, s) in enumerate(scale.items()):
            rows = s["rows"]
            n = [r["sites"] for r in rows]
            c = f"C{i}"
            ax1.plot(n, [r["mean_round_seconds"] or np.nan for r in rows], "o-", color=c, label=f"{job} round")
            ax1.plot(n, [r["site_work_max"] or np.nan for r in rows], "x--", color=c, label=f"{job} longest site work")
            ax2.plot(n, [(r["server_peak_bytes"] or np.nan) / MIB for r in rows], "o-", color=c, label=f"{job} server")
            ax2.plot(
                n, [(r["total_peak_bytes"] or np.nan) / MIB for r in rows], "x--", color=c, label=f"{job} all processes"
            )
        for ax, ylabel in ((ax1, "seconds per round"), (ax2, "peak RSS (MiB)")):
            ax.set_xlabel("simulated sites")
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=7)
        ax1.set_title("round time vs sites")
        ax2.set_title("memory vs sites")

    return draw


# ---- markdown ----------------------------------------------------------------------------------------------


def _machine_section(results: Mapping[str, Any]) -> list[str]:
    m = results["machine"]
    v = m["versions"]
    gpus = ", ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in m["gpus"]) or "none (torch.cuda not available)"
    lines = ["## Machine and settings", ""]
    lines += _table(
        ["what", "value"],
        [
            ["CPU", m["cpu_model"]],
            ["cores (logical / physical)", f"{m['logical_cores']} / {m['physical_cores']}"],
            ["RAM", f"{m['ram_gib']} GiB ({m['ram_available_gib_at_start']} GiB available at start)"],
            ["GPU", gpus],
            ["OS", m["os"]],
            [
                "versions",
                ", ".join(f"{k} {v[k]}" for k in ("python", "torch", "monai", "nvflare", "numpy", "psutil") if k in v),
            ],
            [
                "load average (1 min) at start / end",
                f"{m['load_average_at_start'][0]} / {m.get('load_average_at_end', ['n/a'])[0]}",
            ],
        ],
    )
    lines += _other_work_lines(results)
    s = results["settings"]
    lines += [f"Command: `{results.get('command', '')}` (mode **{s['mode']}**).", ""]
    lines += _table(
        ["setting", "value"],
        [
            ["jobs", ", ".join(s["jobs"])],
            ["sites (main runs)", s["sites"]],
            (
                ["federation", f"`{s['sites_file']}` (its own cases and sequences)"]
                if s.get("sites_file")
                else ["synthetic volumes", f"{s['size']}^3, {s['cases_per_site']} cases per site"]
            ),
            ["training overrides", f"`{json.dumps(s['training'])}`" if s.get("training") else "none"],
            ["rounds (main runs)", s["rounds"]],
            ["epochs per round", s["epochs_per_round"] or "the job's"],
            ["scale runs", f"{', '.join(map(str, s['scale_sites']))} sites, {s['scale_rounds']} rounds"],
            ["memory sampling", f"every {s['sample_interval']} s (psutil RSS of the simulator's process tree)"],
            ["inference case", "x".join(map(str, s["inference_size"]))],
        ],
    )
    cases = results.get("federation", {}).get("cases", {})
    if cases:
        lines += [
            "Cases per site (training / validation): "
            + ", ".join(f"{k} {v['training']}/{v['validation']}" for k, v in sorted(cases.items())),
            "",
        ]
    for job, training in results.get("job_settings", {}).items():
        data = training.get("data", {})
        lines += [
            f"- `{job}`: method {training.get('method')}, {training.get('epochs_per_round')} epoch(s)/round, "
            f"crop {data.get('roi_size')}, zoom {data.get('zoom', 1.0)}, batch {data.get('batch_size')}, "
            f"{training.get('num_threads')} torch "
            "thread per site"
        ]
    lines += [
        "",
        "Section wall times: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in results.get("section_seconds", {}).items())
        + f"; total {results.get('total_seconds', 0):.0f} s.",
        "",
    ]
    return lines


def _overhead_section(fed: Mapping[str, Any], plot: str | None, interval: float | None) -> list[str]:
    lines = ["## 1. Federated overhead", ""]
    lines += [
        "Simulator rounds (`metrics.json` seconds, every site in its own process, one torch thread each) against "
        "the same work without NVFlare: every site in its own process, in parallel, one thread each, doing what "
        "the Client API script does (load the global weights, validate, train, compute the extras) and then the "
        "job's aggregation. Means over the rounds after the first (round 0 includes building each site's "
        "trainer and caching its data).",
        "",
    ]
    rows = []
    for job, e in fed.items():
        o = e["overhead"]
        verdict = "n/a"
        if o["round_ratio"] is not None:
            verdict = "meets" if o["round_ratio"] <= OVERHEAD_TARGET else "above"
        rows.append(
            [
                job,
                _s(o["federated_round_seconds"]),
                _s(o["local_round_seconds"]),
                f"**{_s(o['round_ratio'])}** ({verdict} {OVERHEAD_TARGET})",
                _s(o["median_round_ratio"]),
                _s(o["per_round_overhead_seconds"]),
                f"{_s(o['federated_site_work_max'])} / {_s(o['local_site_work_max'])} ({_s(o['site_work_ratio'])})",
                _s(o["break_even_round_seconds_for_1_10"], 0),
            ]
        )
    lines += _table(
        [
            "job",
            "simulator round (s)",
            "without NVFlare (s)",
            "ratio (mean)",
            "ratio (median)",
            "extra s/round",
            "longest site's own work: sim / local (ratio)",
            "round length for ratio 1.10 (s, derived)",
        ],
        rows,
    )
    rows = []
    for job, e in fed.items():
        f, o, loc = e["federated"], e["overhead"], e["local"]
        ph = f.get("outside_rounds_phases", {})
        rows.append(
            [
                job,
                _s(f["total_seconds"], 1),
                _s(o["job_startup_seconds"], 1),
                _s(ph.get("before_workflow"), 1),
                _s(ph.get("final_validation"), 1),
                _s(ph.get("shutdown"), 1),
                _s(o["round0_federated_seconds"], 1),
                f"{_s(loc['setup_seconds'], 1)} + {_s(o['local_round0_seconds'], 1)}",
            ]
        )
    lines += [
        "Job start-up is reported apart from the rounds: simulator wall time minus the sum of the round times "
        "(it holds the simulator's start, the final validation of the global model and the shutdown).",
        "",
    ]
    lines += _table(
        [
            "job",
            "simulator total (s)",
            "outside rounds (s)",
            "of which: start to workflow",
            "final validation",
            "shutdown",
            "round 0 (s)",
            "without NVFlare: setup + round 0 (s)",
        ],
        rows,
    )
    rows = []
    for job, e in fed.items():
        b = e["federated"].get("mean_breakdown") or {}
        rows.append(
            [
                job,
                _s(b.get("wall")),
                _s(b.get("dispatch")),
                _s(b.get("site_work_max")),
                _s(b.get("sites_span")),
                _s(b.get("return")),
                _s(b.get("aggregate")),
            ]
        )
    lines += [
        "Where a simulator round goes (from the time-stamped log; means over the rounds after the first): "
        "*dispatch* is from the server sending the task to the first site starting its work; *site work* is "
        "the longest site's validation + training + extras; *sites span* from the first site starting to the "
        "last finishing; *return* from the last site's `sent update` until the server has every result; "
        "*aggregate* from then to the round's end (checks, aggregation, saving, model selection).",
        "",
    ]
    lines += _table(["job", "round (s)", "dispatch", "longest site work", "sites span", "return", "aggregate"], rows)
    lines += _overhead_findings(fed, interval)
    if plot:
        lines += [f"![round times]({plot})", ""]
    return lines


def _overhead_findings(fed: Mapping[str, Any], interval: float | None) -> list[str]:
    out = ["Findings:", ""]
    for job, e in fed.items():
        o = e["overhead"]
        b = e["federated"].get("mean_breakdown") or {}
        if o["round_ratio"] is None or not b:
            continue
        extra = o["per_round_overhead_seconds"] or 0.0
        local_rest = (o["local_round_seconds"] or 0.0) - (o["local_site_work_max"] or 0.0)
        out.append(
            f"- `{job}`: a simulator round took {_s(o['federated_round_seconds'])} s against "
            f"{_s(o['local_round_seconds'])} s without NVFlare (ratio {_s(o['round_ratio'])}, {_s(extra)} s more). "
            f"In the simulator the longest site's own work took {_s(b.get('site_work_max'))} s "
            f"({_s(o['site_work_ratio'])}x its time without NVFlare, {_s(o['local_site_work_max'])} s), dispatch "
            f"{_s(b.get('dispatch'))} s, return {_s(b.get('return'))} s and aggregation {_s(b.get('aggregate'))} s; "
            f"without NVFlare everything but the longest site's work took {_s(local_rest)} s."
        )
    setting = f"{interval:g} s in these jobs" if interval is not None else "not set"
    out += [
        "- Dispatch and return are polling, not computing: after sending a result, a client sleeps the server's "
        f"`task_request_interval` ({setting}; NVFlare's default is 2 s) before asking for its next task; the "
        "in-process trainer's `flare.receive()` looks for the task every 0.5 s and the executor for the "
        "trainer's result every 0.5 s (NVFlare 2.9 constants, not configurable); the controller wakes when a "
        "result arrives. This is a fixed cost per round, independent of the model and data: the ratio "
        "falls towards 1 as rounds get longer (see the derived round length at which it reaches 1.10).",
        "",
    ]
    return out


def _throughput_section(tp: Mapping[str, Any], plot: str | None) -> list[str]:
    lines = ["## 2. Training throughput per site (CPU)", ""]
    lines += [
        "Whole local rounds (augmentation and data loading included) after one untimed round that also switches "
        "on FedKD's distillation; a case is one training crop of the job's `roi_size`.",
        "",
    ]
    rows = []
    for job, e in tp.items():
        for key in ("one_thread", "one_thread_fp32", "all_threads"):
            for site, r in sorted(e.get(key, {}).items()):
                rows.append(
                    [
                        job,
                        site,
                        "+".join(r["modalities"]),
                        r["threads"],
                        r.get("precision", "fp32"),
                        "x".join(map(str, r["roi_size"])),
                        r["batch_size"],
                        r["steps"],
                        _s(r["seconds_per_step"], 3),
                        _s(r["cases_per_second"]),
                        f"{(r['voxels_per_second'] or 0) / 1e6:.2f}",
                    ]
                )
    lines += _table(
        ["job", "site", "sequences", "threads", "precision", "crop", "batch", "steps", "s/step", "cases/s", "Mvox/s"],
        rows,
    )
    for job, e in tp.items():
        gpu = e.get("gpu", {})
        if not gpu.get("measured"):
            lines += [f"- `{job}` on GPU: {gpu.get('reason', NO_GPU)}."]
            continue
        lines += [f"- `{job}` on {gpu.get('device')} (AMP dtype {gpu.get('amp_dtype')}):", ""]
        grows = []
        for name, r in gpu.items():
            if not isinstance(r, dict):
                continue
            if "error" in r:
                grows.append([name, "failed", r["error"], "", ""])
            else:
                grows.append(
                    [
                        name,
                        _s(r["seconds_per_step"], 4),
                        _s(r["cases_per_second"], 1),
                        f"{r['voxels_per_second'] / 1e6:.1f}",
                        _s(r["peak_memory_gib"], 2),
                    ]
                )
        lines += _table(["variant", "s/step", "cases/s", "Mvoxels/s", "peak GiB"], grows)
    lines += [""]
    if plot:
        lines += [f"![throughput]({plot})", ""]
    return lines


#: Average cores of other work above which a run (or a section) is reported as not idle.
OTHER_WORK_LIMIT = 0.25


def _other_work_lines(results: Mapping[str, Any]) -> list[str]:
    """Whether other work competed for the CPU: CPU time not spent by the benchmark's own processes (the load
    average cannot tell, as the benchmark itself runs more processes than cores)."""
    m = results["machine"]
    whole = m.get("other_work_cores")
    sections = results.get("section_other_work_cores") or {}
    if whole is None:
        start = m["load_average_at_start"][0]
        return [
            f"Other work during the run: not recorded (1-minute load average at the start: {start}).",
            "",
        ]
    busy = {k: v for k, v in sections.items() if v > 2 * OTHER_WORK_LIMIT}
    per_section = ", ".join(f"{k} {v:.2f}" for k, v in sections.items())
    if whole > OTHER_WORK_LIMIT or busy:
        return [
            f"**The machine was not idle**: other work kept {whole:.2f} core(s) busy on average (by section: "
            f"{per_section}). Timings are pessimistic and ratios noisier; rerun on an idle machine for figures to "
            "quote.",
            "",
        ]
    return [
        f"Other work during the run: {whole:.2f} core(s) on average (by section: {per_section}): the machine was "
        "otherwise idle.",
        "",
    ]


def _rounds_compared(growth: Mapping[str, Any]) -> str:
    def span(rounds: list[int]) -> str:
        return f"{rounds[0]}-{rounds[-1]}" if len(rounds) > 1 else str(rounds[0])

    early = growth.get("from_rounds") or [growth["from_round"]]
    late = growth.get("to_rounds") or [growth["to_round"]]
    return f"{span(early)} -> {span(late)}"


def _memory_section(fed: Mapping[str, Any], plot: str | None) -> list[str]:
    lines = ["## 3. Memory", ""]
    lines += [
        "Peak RSS of each simulator process (psutil; the server is the parent of the `simulator_worker` client "
        "processes) and its growth after warm-up: the median per-round peak of the last three rounds against that "
        "of rounds 2-4 (rounds are numbered from 0; the first includes start-up; with fewer than eight rounds, "
        "single rounds: the last against round 2, or round 1 with only three). "
        f"Target: growth below {MEMORY_GROWTH_TARGET:.0%}. Without NVFlare, each site "
        "process's peak for comparison.",
        "",
    ]
    rows = []
    for job, e in fed.items():
        mem = e["federated"]["memory"]
        local = e["local"]["memory"]
        for label, m in mem.items():
            if label in ("launcher", "manager"):
                continue
            g = m.get("growth")
            verdict = ""
            if g is not None:
                verdict = "ok" if g["fraction"] < MEMORY_GROWTH_TARGET else "**above target**"
            rows.append(
                [
                    job,
                    label,
                    _mib(m["peak_bytes"]),
                    _mib(local.get(label, {}).get("peak_bytes")) if label.startswith("client:") else "",
                    _rounds_compared(g) if g else "fewer than 3 rounds",
                    _pct(g["fraction"]) if g else "n/a",
                    verdict,
                ]
            )
        rows.append([job, "all simulator processes", _mib(e["federated"]["total_peak_bytes"]), "", "", "", ""])
    lines += _table(
        ["job", "process", "peak RSS (MiB)", "without NVFlare (MiB)", "rounds compared", "growth", ""], rows
    )
    if plot:
        lines += [f"![memory]({plot})", ""]
    return lines


def _communication_section(fed: Mapping[str, Any], plot: str | None) -> list[str]:
    lines = ["## 4. Communication", ""]
    lines += [
        "Bytes per training round (rounds after the first), from each site's payload audit (every weight's and "
        "extra's shape and dtype as it left the site). Received: the global model plus the server's extras "
        "(model spec, FedKD's global prototypes). Raw array bytes; NVFlare's message framing is not counted.",
        "",
    ]
    rows = []
    for job, e in fed.items():
        comm = e["federated"]["communication"]
        model = comm["model"]
        for site, s in sorted(comm["sites"].items()):
            extras = ", ".join(f"{k} {v} B" for k, v in sorted(s["largest_extras"].items())) or "-"
            absent = s.get("absent_sequence_weights_per_round", 0.0)
            rows.append(
                [
                    job,
                    site,
                    "+".join(s.get("modalities", [])),
                    f"{model['parameters']:,} ({_mib(model['bytes'])} MiB)",
                    f"{s['sent_per_round']:,.0f}",
                    _s(s["sent_x_model"], 4),
                    f"{absent:,.0f} ({100 * absent / max(s['sent_per_round'], 1):.0f} %)",
                    f"{s['received_per_round']:,.0f}",
                    _s(s["received_x_model"], 4),
                    extras,
                ]
            )
    lines += _table(
        [
            "job",
            "site",
            "sequences",
            "model parameters",
            "sent B/round",
            "sent x model",
            "of which: encoders of absent sequences",
            "received B/round",
            "received x model",
            "extras sent (>= 64 B)",
        ],
        rows,
    )
    lines += [
        "- The final validation moves the model once more each way per site (sites return their weights with "
        "the metrics so that NVFlare's model selector also judges the final model).",
    ]
    for job, e in fed.items():
        sites = e["federated"]["communication"]["sites"]
        wasted = {
            k: v.get("absent_sequence_weights_per_round", 0.0) / max(v["sent_per_round"], 1) for k, v in sites.items()
        }
        if any(w > 0 for w in wasted.values()):
            worst = max(wasted, key=wasted.get)
            lines.append(
                f"- `{job}`: sites send the encoders of sequences they lack, untouched by their training and ignored "
                f"by the modality-aware aggregation: up to {100 * wasted[worst]:.0f} % of an update ({worst}). "
                "Leaving them out would need the server to accept partial updates (not done)."
            )
    lines += [""]
    if plot:
        lines += [f"![communication]({plot})", ""]
    return lines


def _inference_section(inf: Mapping[str, Any], plot: str | None) -> list[str]:
    lines = ["## 5. Inference (CPU)", ""]
    lines += [
        f"`predict_case` on one synthetic {'x'.join(map(str, inf['case_size']))} case, whole pipeline (reading, "
        "foreground crop, resampling, normalisation, sliding-window inference, back to the input grid), "
        f"{inf['threads']} torch threads, randomly initialised networks (the time does not depend on the "
        "weights). `zoom` is the resampling the model was trained with (0.5 for CPU training on real data).",
        "",
    ]
    rows = [
        [
            r["job"],
            r["subset"].replace("t1+t1ce+t2+flair", "all four"),
            "x".join(map(str, r["roi_size"])),
            r["overlap"],
            r["zoom"],
            r.get("precision", "fp32"),
            r["repeats"],
            _s(r["seconds"], 1),
            f"{r['voxels_per_second'] / 1e6:.2f}",
        ]
        for r in inf["rows"]
    ]
    lines += _table(["job", "sequences", "window", "overlap", "zoom", "precision", "runs", "s/case", "Mvoxels/s"], rows)
    slowest = {}
    for r in inf["rows"]:
        key = (r["job"], tuple(r["roi_size"]), r["zoom"], r.get("precision", "fp32"))
        if r["num_sequences"] == 1 and (key not in slowest or r["seconds"] > slowest[key]["seconds"]):
            slowest[key] = r
    for (job, roi, zoom, precision), r in sorted(slowest.items()):
        full = next(
            (
                x
                for x in inf["rows"]
                if x["job"] == job
                and tuple(x["roi_size"]) == roi
                and x["zoom"] == zoom
                and x.get("precision", "fp32") == precision
                and x["num_sequences"] == 4
            ),
            None,
        )
        if full:
            lines.append(
                f"- `{job}`, window {roi[0]}, zoom {zoom:g}, {precision}: all four sequences "
                f"{_s(full['seconds'], 1)} s, slowest single sequence ({r['subset']}) {_s(r['seconds'], 1)} s."
            )
    lines += [""]
    if plot:
        lines += [f"![inference]({plot})", ""]
    return lines


def _fit_text(fit: Mapping[str, Any] | None, unit: str, scale: float = 1.0) -> str:
    if not fit:
        return "not enough points"
    lin = fit["linear"]
    a, b = lin["intercept"] / scale, lin["slope"] / scale
    text = f"{b:.3g} {unit} more per site (line {a:.3g} + {b:.3g} n)"
    if fit.get("exponent") is None:
        return text + "; two points only, so linear vs sublinear is not determined"
    return text + f"; growing part ~ n^{fit['exponent']:.2f}: **{fit['verdict']}**"


def _scale_section(scale: Mapping[str, Any], plot: str | None) -> list[str]:
    lines = ["## 6. Scale", ""]
    lines += [
        "Round time and memory against the number of simulated sites, at fixed data per site (sites cycle "
        "through the four sequence profiles), every site in its own process with one torch thread.",
        "",
    ]
    for job, s in scale.items():
        rows = [
            [
                r["sites"],
                _s(r["mean_round_seconds"]),
                _s(r["dispatch"]),
                _s(r["site_work_max"]),
                _s(r["site_work_mean"]),
                _s(r["return"]),
                _s(r["aggregate"]),
                _mib(r["server_peak_bytes"]),
                _pct(r["server_growth"]),
                _mib(r["client_peak_bytes_mean"]),
                _mib(r["total_peak_bytes"]),
            ]
            for r in s["rows"]
        ]
        lines += [f"`{job}`:", ""]
        lines += _table(
            [
                "sites",
                "round (s)",
                "dispatch",
                "longest site work",
                "mean site work",
                "return",
                "aggregate",
                "server peak (MiB)",
                "server growth",
                "client peak (MiB, mean)",
                "all processes (MiB)",
            ],
            rows,
        )
        lines += [
            f"- round time: {_fit_text(s.get('fit_round_seconds'), 's')}",
            f"- longest site's work: {_fit_text(s.get('fit_site_work_max'), 's')}",
            f"- server peak RSS: {_fit_text(s.get('fit_server_peak_bytes'), 'MiB', MIB)}",
            f"- all processes' peak RSS: {_fit_text(s.get('fit_total_peak_bytes'), 'MiB', MIB)}",
            "",
        ]
    lines += [
        "Where the time goes: with more sites than cores, the sites' training shares the CPU, so the longest "
        "site's work grows with the number of sites (CPU contention, not NVFlare); the rest of a round "
        "(dispatch, return, aggregation) is the federation's own cost. Every site is a separate Python process "
        "holding torch, MONAI and NVFlare (the client peak column), so the total grows by about one such process "
        "per site.",
        "",
    ]
    if plot:
        lines += [f"![scale]({plot})", ""]
    return lines


def write_report(results: Mapping[str, Any], out_dir: str) -> str:
    """Write ``report.md`` and the PNG plots of ``results`` into ``out_dir``; return the report's path."""
    lines = [
        "# fedbrats benchmarks",
        "",
        f"Mode **{results['settings']['mode']}**, started {results.get('started')}, finished "
        f"{results.get('finished', 'n/a')}. Machine-readable figures: `results.json`. How to run and what each "
        "figure means: `benchmarks/README.md`.",
        "",
    ]
    lines += _machine_section(results)
    fed = results.get("federated")
    if fed:
        lines += _overhead_section(
            fed,
            _plot(out_dir, "overhead.png", _plot_overhead(fed), (6 * len(fed), 4)),
            results.get("task_request_interval"),
        )
    tp = results.get("throughput")
    if tp:
        lines += _throughput_section(tp, _plot(out_dir, "throughput.png", _plot_throughput(tp), (8, 4)))
    if fed:
        lines += _memory_section(fed, _plot(out_dir, "memory.png", _plot_memory(fed), (6 * len(fed), 4)))
        lines += _communication_section(
            fed, _plot(out_dir, "communication.png", _plot_communication(fed), (5 * len(fed), 4))
        )
    inf = results.get("inference")
    if inf and inf.get("rows"):
        lines += _inference_section(
            inf, _plot(out_dir, "inference.png", _plot_inference(inf["rows"]), (8, 1 + 0.35 * len(inf["rows"])))
        )
    scale = results.get("scale")
    if scale:
        lines += _scale_section(scale, _plot(out_dir, "scale.png", _plot_scale(scale), (11, 4)))
    missing = [s for s in results.get("sections", []) if s not in results or not results[s]]
    if missing:
        lines += [f"Sections not completed: {', '.join(missing)} (see the log).", ""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return path
