"""Entry point: ``python -m benchmarks.run [--quick] [--only NAME ...] [--out DIR]`` (or ``make bench``).

Every benchmark runs in a fresh Python process of its own (a clean heap for the memory figures, no threads left
behind by another benchmark), one after the other; its cases are interleaved inside that process. The results
are written as ``results.json`` and ``results.md``: into ``benchmarks/results/`` for a full run of everything,
into ``benchmarks/results/raw/`` (not tracked) for ``--quick`` or ``--only`` runs unless ``--out`` says otherwise,
so a partial run never overwrites the committed figures.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT

RESULTS = ROOT / "benchmarks" / "results"
RAW = RESULTS / "raw"

#: name -> (module, one line); the order is the order they run in.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "hook_time": ("benchmarks.hooks", "µs per step inside the hooks vs Lightning's three monitors (tiny model)"),
    "breakdown": ("benchmarks.breakdown", "µs per call of each part of the callback's step path"),
    "end_to_end": ("benchmarks.end_to_end", "step time with / without the callback: PyG GCN and DGDN"),
    "scrape": ("benchmarks.scrape", "/metrics latency for 1 and 8 ranks' label sets"),
    "memory": ("benchmarks.memory", "RSS growth over 100k steps"),
    "run_end": ("benchmarks.run_end", "last batch to fit returning (OTLP receiver live, closed, hanging; scraper "
                "live, slow, stopped) and fit returning to the process's exit"),
    "detection": ("benchmarks.detection", "seconds from a hang, a hung collective, a straggler, a killed run and a NaN "
                  "loss to the stack dump or the alert (real Prometheus)"),
    "gpu": ("benchmarks.gpu", "synchronisations and GPU step-time ratio (CUDA only; skipped otherwise)"),
}


def run_one(name: str, quick: bool, raw_dir: Path) -> dict[str, Any]:
    """Run benchmark ``name`` in this process."""
    from benchmarks.common import quiet, set_threads

    quiet()
    set_threads()
    module = importlib.import_module(BENCHMARKS[name][0])
    kwargs: dict[str, Any] = {"quick": quick}
    if name == "hook_time":
        kwargs["raw_dir"] = raw_dir
    started = time.perf_counter()
    result = module.run(**kwargs)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def run_isolated(name: str, quick: bool, raw_dir: Path) -> dict[str, Any]:
    """Run benchmark ``name`` in a fresh interpreter and return its result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "benchmarks.run", "--child", name, "--child-out", str(out),
                   "--raw", str(raw_dir)] + (["--quick"] if quick else [])
        completed = subprocess.run(command, cwd=ROOT)
        if completed.returncode != 0 or not out.exists():
            return {"name": name, "error": f"the benchmark process exited with status {completed.returncode}"}
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and repetitions (about 2 minutes)")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), metavar="NAME",
                        help="run only these: " + ", ".join(BENCHMARKS))
    parser.add_argument("--out", type=Path, help="where to write results.json and results.md")
    parser.add_argument("--in-process", action="store_true", help="run every benchmark in this process")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--render-only", action="store_true",
                        help="rebuild results.md (and the summary in results.json) from an existing results.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--raw", type=Path, default=RAW, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.list:
        for name, (_, line) in BENCHMARKS.items():
            print(f"{name:12} {line}")
        return 0
    if args.child:
        result = run_one(args.child, args.quick, args.raw)
        args.child_out.write_text(json.dumps(result))
        return 0

    from benchmarks.common import machine_info
    from benchmarks.report import markdown, summary_rows

    names = args.only or list(BENCHMARKS)
    partial = args.quick or args.only is not None
    out_dir = args.out or (RAW if partial else RESULTS)
    if args.render_only:
        report = json.loads((out_dir / "results.json").read_text())
        report["summary"] = summary_rows({k: v for k, v in report["results"].items() if "error" not in v})
        (out_dir / "results.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        (out_dir / "results.md").write_text(markdown(report))
        print(f"[benchmarks] rebuilt {out_dir / 'results.md'}")
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    args.raw.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    machine["torch_threads"] = 1  # set_threads() in every benchmark process
    started = time.perf_counter()
    results: dict[str, Any] = {}
    for name in names:
        print(f"[benchmarks] {name}: {BENCHMARKS[name][1]} ...", flush=True)
        results[name] = run_one(name, args.quick, args.raw) if args.in_process else \
            run_isolated(name, args.quick, args.raw)
        print(f"[benchmarks] {name}: {'error: ' + results[name]['error'] if 'error' in results[name] else 'done'}"
              f" ({results[name].get('seconds', '?')} s)", flush=True)
    report = {
        "quick": args.quick,
        "benchmarks": names,
        "finished": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "duration_s": time.perf_counter() - started,
        "machine": machine,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "results": results,
    }
    report["summary"] = summary_rows({k: v for k, v in results.items() if "error" not in v})
    (out_dir / "results.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    text = markdown(report)
    (out_dir / "results.md").write_text(text)
    print(text)
    print(f"[benchmarks] wrote {out_dir / 'results.json'} and {out_dir / 'results.md'}")
    return 1 if any("error" in v for v in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
