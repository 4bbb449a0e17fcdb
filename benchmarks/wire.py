"""Bytes on the wire per round, each way, with and without SVD compression, and the final validation Dice.

``python benchmarks/wire.py --out-dir benchmarks/results/wire --rounds 3``: runs each configuration in NVFlare's
simulator on the embedded synthetic federation (or ``FEDBRATS_SITE_CONFIG``) and reads the bytes from the sites'
payload audits: ``payload_audit.jsonl`` (every train result a site sent, after all its filters) and, where the
job compresses, ``payload_audit_in.jsonl`` (every task that arrived, before decompression). A job without
compression receives the full global model, whose bytes are those of the saved model. Bytes are raw payload
bytes (arrays: elements x itemsize, as :func:`benchmarks.federated.described_bytes` counts them); NVFlare's framing
is not counted. Writes ``results.json`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

if __name__ == "__main__":  # run as a script: the repository root holds the benchmarks package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.federated import described_bytes, model_bytes  # noqa: E402
from fedbrats.federated.protocol import KEY_METRIC, NUM_STEPS_KEY
from fedbrats.runs import PAYLOAD_AUDIT_FILE, PAYLOAD_AUDIT_IN_FILE

logger = logging.getLogger(f"fedbrats.{__name__}")

#: name -> (job, compression): the configurations measured by default.
CONFIGS: dict[str, tuple[str, bool]] = {
    "fedavg": ("fedavg", False),
    "fedavg+svd": ("fedavg", True),
    "fedmic": ("fedmic", True),
    "fedmic-no-svd": ("fedmic", False),
}


def _records(path: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _payload_bytes(record: dict[str, Any]) -> int:
    return sum(described_bytes(d) for d in record["data"].values()) + sum(
        described_bytes(d) for d in record["meta"].values()
    )


def wire_bytes(sim_ws: str, run_dir: str, sites: list[str]) -> dict[str, Any]:
    """Per training round: the mean bytes a site sent (weights and meta) and received (weights), from the audits.

    Returns:
        ``{"rounds": {r: {"sent": ..., "received": ...}}, "dense_model_bytes": ...}`` (means over sites).
    """
    dense = model_bytes(run_dir)["bytes"]
    sent: dict[int, list[int]] = {}
    received: dict[int, list[int]] = {}
    for site in sites:
        folder = os.path.join(sim_ws, site, "simulate_job")
        for rec in _records(os.path.join(folder, PAYLOAD_AUDIT_FILE)):
            if NUM_STEPS_KEY in rec["meta"] and rec.get("round") is not None:
                sent.setdefault(int(rec["round"]), []).append(_payload_bytes(rec))
        arrived = _records(os.path.join(folder, PAYLOAD_AUDIT_IN_FILE))
        for rec in arrived:
            if rec.get("task") in ("train", "") and rec.get("round") is not None and int(rec["round"]) in sent:
                received.setdefault(int(rec["round"]), []).append(sum(described_bytes(d) for d in rec["data"].values()))
        if not arrived:  # no compression: the full global model every round
            for r in sent:
                received.setdefault(r, []).append(dense)
    rounds = {
        r: {"sent": float(np.mean(sent[r])), "received": float(np.mean(received.get(r, [float("nan")])))}
        for r in sorted(sent)
    }
    return {"rounds": rounds, "dense_model_bytes": dense}


def measure(name: str, job: str, compression: bool, workspace: str, rounds: int, sites_file: str | None) -> dict:
    """Run one configuration and return its bytes per round and its final validation."""
    from fedbrats.simulate import simulate, simulator_workspace

    ws = os.path.join(workspace, name)
    started = time.monotonic()
    result = simulate(job, ws, sites_file=sites_file, num_rounds=rounds, compression=compression)
    final = result.history[-1] if result.history and result.history[-1].get("final_validation") else {}
    sites = sorted(final.get("sites", {})) or sorted(result.history[0]["sites"])
    out = {
        "job": job,
        "compression": compression,
        "seconds": round(time.monotonic() - started, 1),
        "final_val_mean_dice": final.get("aggregated", {}).get(KEY_METRIC),
        "final_val_dice": {k: v for k, v in final.get("aggregated", {}).items() if k.startswith("val_dice_")},
        **wire_bytes(simulator_workspace(ws), result.run_dir, sites),
    }
    logger.info("%s: %s", name, json.dumps({k: v for k, v in out.items() if k != "rounds"}))
    return out


def report(results: dict[str, Any], command: str) -> str:
    """The markdown table of :func:`measure`'s results."""
    lines = [
        "# Bytes on the wire per round (mean per site) and final validation Dice",
        "",
        f"Command: `{command}`",
        "",
        "| configuration | dense model | round | site -> server | server -> site | final val mean Dice |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, res in results.items():
        dice = res.get("final_val_mean_dice")
        for i, (r, v) in enumerate(res["rounds"].items()):
            lines.append(
                f"| {name if i == 0 else ''} | {res['dense_model_bytes'] if i == 0 else ''} | {r} | "
                f"{v['sent']:.0f} | {v['received']:.0f} | {f'{dice:.3f}' if i == 0 and dice is not None else ''} |"
            )
    return "\n".join(lines) + "\n"


def compare_runs_bytes(workspace: str, names: list[str], seeds: list[int]) -> dict[str, dict[int, dict[str, Any]]]:
    """Bytes per round of the finished runs of ``experiments/compare.py`` in ``workspace`` (``<name>/seed<k>``).

    Returns:
        name -> seed -> :func:`wire_bytes` plus ``sent_mean``/``received_mean`` (means over the training rounds,
        the first included: with compression its download is the full model, first contact),
        ``received_later_mean`` (rounds 1 on) and ``seconds``.
    """
    from fedbrats.simulate import simulated_run_dir, simulator_workspace

    out: dict[str, dict[int, dict[str, Any]]] = {}
    for name in names:
        for seed in seeds:
            run_ws = os.path.join(workspace, name, f"seed{seed}")
            run_dir = simulated_run_dir(run_ws)
            if not os.path.isfile(os.path.join(run_dir, "metrics.json")):
                logger.warning("%s seed %d: no finished run in %s; left out", name, seed, run_ws)
                continue
            with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as f:
                history = json.load(f)
            sites = sorted(history[0]["sites"])
            measured = wire_bytes(simulator_workspace(run_ws), run_dir, sites)
            rounds = measured["rounds"]
            measured["sent_mean"] = float(np.mean([r["sent"] for r in rounds.values()]))
            measured["received_mean"] = float(np.mean([r["received"] for r in rounds.values()]))
            # From round 1 on: with compression, the first download is the full model (first contact), a cost
            # that a longer run spreads over more rounds.
            later = [r["received"] for k, r in rounds.items() if int(k) >= 1] or [float("nan")]
            measured["received_later_mean"] = float(np.mean(later))
            out.setdefault(name, {})[seed] = measured
    return out


def reference_pair(paired: dict[str, Any], name: str, baseline: str) -> tuple[str | None, dict[str, Any] | None]:
    """The paired difference of ``name`` to ``baseline`` if the comparison has it, else to whatever the comparison
    pairs ``name`` with (a compressed method's own uncompressed run); ``(None, None)`` when it has none."""
    if f"{name} vs {baseline}" in paired:
        return baseline, paired[f"{name} vs {baseline}"]
    for key, pair in paired.items():
        if key.startswith(f"{name} vs "):
            return key[len(f"{name} vs ") :], pair
    return None, None


def curve_report(
    measured: dict[str, dict[int, dict[str, Any]]], comparison: dict[str, Any], baseline: str, command: str
) -> str:
    """Bytes per round against the 15-combination test Dice of each configuration, and the paired difference to
    ``baseline`` (from ``experiments/compare.py``'s ``comparison.json``)."""
    dense = next(iter(measured[baseline].values()))["dense_model_bytes"] if baseline in measured else None
    lines = [
        "# Bytes on the wire against Dice",
        "",
        f"Command: `{command}`",
        "",
        "Bytes: mean per site and training round (first round included), from the runs' payload audits; x: how many",
        f'times fewer than the dense model ({dense} B) each way; "rounds >= 1": the download without the first',
        "round's (with compression the full model, first contact). Dice: mean over the 15 sequence combinations on the",
        f"test cases, mean ± std over seeds; the difference to `{baseline}` (or, where the comparison did not pair",
        "the two, to the configuration's own uncompressed run) is paired by seed over (test case x combination),",
        "with its 95 % bootstrap interval.",
        "",
        "| configuration | seeds | site -> server | x | server -> site | x | rounds >= 1 | x | Dice mean (15) | vs | "
        "difference | 95 % interval |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|--:|",
    ]
    for name, by_seed in measured.items():
        sent = float(np.mean([m["sent_mean"] for m in by_seed.values()]))
        received = float(np.mean([m["received_mean"] for m in by_seed.values()]))
        later = float(np.mean([m.get("received_later_mean", float("nan")) for m in by_seed.values()]))
        dice = comparison["methods"].get(name, {}).get("mean_over_combinations", {}).get("mean_dice")
        reference, pair = reference_pair(comparison["paired"], name, baseline)
        cells = [
            name,
            str(len(by_seed)),
            f"{sent:,.0f}",
            f"{dense / sent:.1f}" if dense else "",
            f"{received:,.0f}",
            f"{dense / received:.1f}" if dense else "",
            f"{later:,.0f}",
            f"{dense / later:.1f}" if dense else "",
            f"{dice['mean']:.3f} ± {dice['std']:.3f}" if dice else "n/a",
            reference or "",
            f"{pair['mean_difference']:+.3f}" if pair else "",
            f"[{pair['ci95'][0]:+.3f}, {pair['ci95'][1]:+.3f}]" if pair else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def curve_main(args: argparse.Namespace, command: str) -> int:
    """``--from-compare``: the bytes-against-Dice table of finished comparison runs."""
    names = [n for n in args.configs.split(",") if n]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    comparison_file = os.path.join(args.compare_out, "comparison.json")
    if not os.path.isfile(comparison_file):
        raise SystemExit(f"--compare-out: {comparison_file} does not exist; run experiments/compare.py first")
    with open(comparison_file, encoding="utf-8") as f:
        comparison = json.load(f)
    measured = compare_runs_bytes(args.from_compare, names, seeds)
    if args.baseline not in measured:
        raise SystemExit(f"--baseline {args.baseline!r}: no finished run in {args.from_compare}")
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"command": command, "bytes": measured}, f, indent=2)
    with open(os.path.join(args.out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(curve_report(measured, comparison, args.baseline, command))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", required=True, help="where results.json and report.md go")
    parser.add_argument(
        "--from-compare",
        default=None,
        metavar="WORKSPACE",
        help="run nothing: read the bytes of experiments/compare.py's finished runs in WORKSPACE (--configs are "
        "then experiment names) and put them beside their test Dice from --compare-out",
    )
    parser.add_argument("--compare-out", default=None, help="with --from-compare: compare.py's --out-dir")
    parser.add_argument("--seeds", default="0,1,2", help="with --from-compare: the seeds")
    parser.add_argument("--baseline", default="fedavg", help="with --from-compare: the uncompressed reference")
    parser.add_argument("--workspace", default=None, help="simulator workspaces (default: <out-dir>/workspace)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {sorted(CONFIGS)}")
    parser.add_argument("--sites-file", default=None, help="sites.json (default: the embedded synthetic data)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.from_compare:
        if not args.compare_out:
            parser.error("--from-compare needs --compare-out")
        return curve_main(args, "python benchmarks/wire.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    names = [n for n in args.configs.split(",") if n]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        parser.error(f"--configs: unknown {unknown}; known {sorted(CONFIGS)}")
    os.makedirs(args.out_dir, exist_ok=True)
    workspace = args.workspace or os.path.join(args.out_dir, "workspace")
    results = {n: measure(n, *CONFIGS[n], workspace, args.rounds, args.sites_file) for n in names}
    command = "python benchmarks/wire.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with open(os.path.join(args.out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"command": command, "rounds": args.rounds, "results": results}, f, indent=2)
    with open(os.path.join(args.out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(report(results, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
