"""Cold-start measurement: start fresh worker processes and account for every phase up to the first audio.

    python -m dia2_worker.coldstart --model-dir /models/dia2 --runs 3 --baseline --json out.json

Each run starts `python -u handler.py` with DIA2_STARTUP_REPORT set: the worker loads as in production,
then times one job to its first audio and writes its phases (start and end on the process's clock, and
the thread each ran on, since loading overlaps the SDK import). `--baseline` also runs the naive start,
`bench/naive_start.py` (everything imported up front, one step after another, float32 weights on the host
then moved and cast, no warm-up), in the same session, so the speed-up is a ratio from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import cli

ROOT = Path(__file__).resolve().parents[1]
HANDLER = ROOT / "handler.py"
NAIVE_START = ROOT / "bench" / "naive_start.py"


def run_once(model_dir: Path, device: str | None, baseline: bool, timeout: float) -> dict:
    """One fresh worker process; returns its report plus the wall time the parent saw."""
    with tempfile.TemporaryDirectory(prefix="coldstart-") as scratch:
        report_path = Path(scratch) / "report.json"
        env = {**os.environ, "MODEL_DIR": str(model_dir), "OUTPUT_DIR": str(Path(scratch) / "output"),
               "DIA2_STARTUP_REPORT": str(report_path)}
        for name in [n for n in env if n.startswith(("RUNPOD_WEBHOOK", "BUCKET_"))]:
            del env[name]  # a measurement stores locally and never talks to a platform
        if device:
            env["DEVICE"] = device
        started = time.monotonic()
        script = NAIVE_START if baseline else HANDLER
        process = subprocess.run([sys.executable, "-u", str(script)], env=env, capture_output=True, text=True,
                                 timeout=timeout)
        wall = time.monotonic() - started
        if process.returncode != 0 or not report_path.is_file():
            raise RuntimeError(f"worker exited with {process.returncode}:\n{process.stdout[-4000:]}"
                               f"\n{process.stderr[-4000:]}")
        report = json.loads(report_path.read_text())
    report["process_wall_s"] = wall
    return report


def durations(report: dict) -> dict[str, float]:
    """Seconds per phase (a phase recorded twice, like a repeated import, is summed)."""
    out: dict[str, float] = {}
    for record in report["phases"]:
        out[record["phase"]] = out.get(record["phase"], 0.0) + record["end"] - record["start"]
    out["ready (process start -> ready)"] = report["ready_s"]
    out["first job: time to first audio"] = report["first_job"]["ttfa_ms"] / 1000
    out["process start -> first audio"] = report["first_job"]["first_audio_s"]
    return out


def table(runs: list[dict], title: str) -> str:
    phases: list[str] = []
    for run in runs:
        phases += [p for p in durations(run) if p not in phases]
    lines = [f"{title}", f"{'phase':<36}" + "".join(f"{'run ' + str(i + 1):>10}" for i in range(len(runs)))
             + f"{'median':>10}"]
    for phase in phases:
        values = [durations(run).get(phase) for run in runs]
        present = [v for v in values if v is not None]
        lines.append(f"{phase:<36}" + "".join(f"{v:>10.3f}" if v is not None else f"{'-':>10}" for v in values)
                     + f"{statistics.median(present):>10.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv, "python -m dia2_worker.coldstart")


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dia2_worker.coldstart", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path(os.environ.get("MODEL_DIR", "/models/dia2")))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", help="cpu or cuda (default: the worker's default)")
    parser.add_argument("--baseline", action="store_true", help="also measure the naive start, for the ratio")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one run may take")
    parser.add_argument("--json", type=Path, help="write every run's report and the summary here")
    args = parser.parse_args(argv)
    if args.runs < 1:
        raise cli.UsageError(f"--runs: must be at least 1, got {args.runs}")
    cli.model_dir(args.model_dir, "--model-dir")
    if args.device:
        cli.device(args.device, "--device")

    modes = [("fast", False)] + ([("baseline", True)] if args.baseline else [])
    results: dict[str, list[dict]] = {name: [] for name, _ in modes}
    for run in range(args.runs):
        for name, baseline in modes:  # interleaved, so both see the same page-cache and load conditions
            print(f"run {run + 1} of {args.runs}: {name} start...", file=sys.stderr, flush=True)
            results[name].append(run_once(args.model_dir, args.device, baseline, args.timeout))
            print(f"  ready after {results[name][-1]['ready_s']:.2f} s", file=sys.stderr, flush=True)
    summary = {}
    for name, runs in results.items():
        print(table(runs, f"\n{name} start ({args.model_dir}, seconds)"))
        summary[name] = {key: statistics.median(durations(run)[key] for run in runs)
                         for key in ("ready (process start -> ready)", "process start -> first audio")}
    if args.baseline:
        ratio = {key: summary["baseline"][key] / summary["fast"][key] for key in summary["fast"]}
        summary["speedup"] = ratio
        print("\nspeed-up over the naive start: " + ", ".join(f"{k}: x{v:.2f}" for k, v in ratio.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        import torch

        from .mimi.bench import machine

        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        args.json.write_text(json.dumps({"model_dir": str(args.model_dir), "device": args.device,
                                         "date": time.strftime("%Y-%m-%d"), "machine": machine(device),
                                         "summary": summary, "runs": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
