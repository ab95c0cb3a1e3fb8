"""Turns the benchmarks' results into the summary rows (figure against target) and the markdown report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

OK, MISS, NONE = "✅", "❌", "—"


# Eight ranks on one endpoint: a reference, since every rank serves its own port.
PER_RANK = "(reference: each rank serves its own port)"


def _mark(met: Optional[bool]) -> str:
    return NONE if met is None else (OK if met else MISS)


def _spread(summary: dict[str, Any], fmt: str = "{:.1f}") -> str:
    if not summary or summary.get("median") is None:
        return "n/a"
    text = fmt.format(summary["median"])
    if summary.get("n", 0) > 1:
        text += f" (IQR {fmt.format(summary['q1'])}–{fmt.format(summary['q3'])})"
    return text


def _ci(interval: Optional[Sequence[float]]) -> str:
    return f"{interval[0]:.3f}–{interval[1]:.3f}" if interval else "n/a"


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per headline figure: benchmark, figure, value, target, met (True/False/None)."""
    rows: list[dict[str, Any]] = []
    hooks = results.get("hook_time")
    if hooks:
        base = hooks["cases"].get("lightning_monitors")
        if base:
            rows.append(
                {
                    "benchmark": "Hook time / step",
                    "figure": "Lightning's 3 monitors (reference)",
                    "value": f"{_spread(base['us_per_step'])} µs",
                    "target": NONE,
                    "met": None,
                }
            )
        for case, ratio in hooks.get("ratios", {}).items():
            data = hooks["cases"][case]
            rows.append(
                {
                    "benchmark": "Hook time / step",
                    "figure": data["description"],
                    "value": f"{_spread(data['us_per_step'])} µs = **{ratio['ratio_of_medians']:.2f}×** "
                    f"(paired {_spread(ratio['paired_ratio'], '{:.2f}')})",
                    "target": f"≤ {ratio['target']}× Lightning's 3",
                    "met": ratio["met"],
                }
            )
    e2e = results.get("end_to_end")
    if e2e:
        for name, data in e2e.get("workloads", {}).items():
            ci = data.get("paired_ratio_ci95")
            alt = data.get("alternating")
            threads = data.get("threads", {}).get("cpu_seconds_per_training_second", {})
            background = sum(v for k, v in threads.items() if k != "MainThread")
            value = ""
            if alt:
                a = alt["with"]
                value += (
                    f"**{a['ratio']:.3f}×** in-loop (epochs alternating in one fit, 95% CI "
                    f"{_ci(a['ratio_ci95'])}; tracing off {alt['with_tracing_off']['ratio']:.3f}×); "
                )
            value += (
                f"fit-level {data['ratio']:.3f}× (95% CI {_ci(ci)}); {data['step_ms_without']['median']:.1f} → "
                f"{data['step_ms_with']['median']:.1f} ms / step; hooks "
                f"{data['callback_hook_share_of_step']['median']:.2%} of the step; background threads "
                f"{background:.1%} of a core"
            )
            rows.append(
                {
                    "benchmark": "End-to-end step time",
                    "figure": f"{name}: with / without callback",
                    "value": value,
                    "target": f"≤ {data['target']}×" if data.get("target") else "(no target)",
                    "met": data.get("met"),
                }
            )
        for note in e2e.get("notes", []):
            rows.append(
                {
                    "benchmark": "End-to-end step time",
                    "figure": note,
                    "value": "not measured",
                    "target": "≤ 1.01×",
                    "met": None,
                }
            )
    scrape = results.get("scrape")
    if scrape:
        for data in scrape["cases"].values():
            label = (
                f"{data['ranks']} rank{'s' if data['ranks'] > 1 else ''}, {data['format']}, {data['samples']} samples"
            )
            rows.append(
                {
                    "benchmark": "Scrape /metrics",
                    "figure": f"{label}: median",
                    "value": f"{data['ms']['median']:.2f} ms",
                    "target": f"≤ {data['target_ms']:g} ms" if data["target_ms"] else PER_RANK,
                    "met": data["ms"]["median"] <= data["target_ms"] if data["target_ms"] else None,
                }
            )
            rows.append(
                {
                    "benchmark": "Scrape /metrics",
                    "figure": f"{label}: p99",
                    "value": f"{data['p99_ms']:.2f} ms",
                    "target": f"≤ {data['target_ms']:g} ms" if data["target_ms"] else PER_RANK,
                    "met": data["met"],
                }
            )
        storm = scrape.get("storm")
        if storm and "cases" in storm:
            for name, data in storm["cases"].items():
                label = (
                    "the endpoint (one render at a time)"
                    if name == "one_render_at_a_time"
                    else "prometheus_client's server, parallel renders (reference)"
                )
                rows.append(
                    {
                        "benchmark": "Scrape storm",
                        "figure": f"CPU-bound step during {storm['scrapers']} concurrent scrapes / s, {label}: "
                        "mean step time vs quiet",
                        "value": f"**{data['ratio_mean']:.3f}×** (median {data['ratio_median']:.3f}×); "
                        f"{storm['step_ms_quiet_mean']:.2f} → {data['step_ms_storm_mean']:.2f} ms / step; "
                        f"{data['scrapes_answered_200']}/{data['scrapes_sent']} answered",
                        "target": f"≤ {storm['target']:.2f}×, all answered" if name == "one_render_at_a_time" else NONE,
                        "met": data["met"] if name == "one_render_at_a_time" else None,
                    }
                )
    memory = results.get("memory")
    if memory:
        d, b = memory["direct"], memory["direct_baseline"]
        notrace = memory.get("direct_notrace")
        rows.append(
            {
                "benchmark": "Memory (RSS)",
                "figure": f"growth over {d['steps']:,} hook-driven steps, tracing every 10th step",
                "value": f"**{d['growth_mib_per_100k']:.2f} MiB / 100k** (fitted slope "
                f"{d['slope_mib_per_100k']:.2f}; "
                + (f"tracing off {notrace['growth_mib_per_100k']:.2f}; " if notrace else "")
                + f"harness alone {b['growth_mib_per_100k']:.2f})",
                "target": f"≤ {memory['target_mib_per_100k']:g} MiB / 100k",
                "met": memory["met"],
            }
        )
        if "trainer" in memory:
            t, tb = memory["trainer"], memory["trainer_baseline"]
            net = t["growth_mib_per_100k"] - max(tb["growth_mib_per_100k"], 0.0)
            rows.append(
                {
                    "benchmark": "Memory (RSS)",
                    "figure": f"cross-check: real Trainer, {t['steps'] - t['warmup_steps']:,} steps after "
                    f"{t['warmup_steps']:,} warm-up, scaled to 100k",
                    "value": f"{net:.2f} MiB / 100k net ({t['growth_mib_per_100k']:.2f} with the callback, "
                    f"{tb['growth_mib_per_100k']:.2f} without)",
                    "target": f"≤ {memory['target_mib_per_100k']:g} MiB / 100k",
                    "met": net <= memory["target_mib_per_100k"],
                }
            )
    run_end = results.get("run_end")
    if run_end:
        for data in run_end["cases"].values():
            s = data["seconds"]
            rows.append(
                {
                    "benchmark": "Run end",
                    "figure": data["description"],
                    "value": f"{s['median']:.2f} s (max {s['max']:.2f})",
                    "target": f"≤ {data['target_s']:g} s" if data["target_s"] else "(reference)",
                    "met": data["met"],
                }
            )
    if "config" in results.get("detection", {}):  # measured (not an error)
        from benchmarks import detection

        rows += detection.rows(results["detection"])
    gpu = results.get("gpu")
    if gpu:
        if gpu.get("skipped"):
            rows.append(
                {
                    "benchmark": "GPU",
                    "figure": "added synchronisations; GPU step-time ratio",
                    "value": f"skipped: {gpu['note']}",
                    "target": "0 syncs",
                    "met": None,
                }
            )
        else:
            rows.append(
                {
                    "benchmark": "GPU",
                    "figure": f"synchronisations inside the hooks ({gpu['device']})",
                    "value": str(gpu["synchronisations_in_hooks"]),
                    "target": "0",
                    "met": gpu["met"],
                }
            )
            st = gpu["step_time"]
            rows.append(
                {
                    "benchmark": "GPU",
                    "figure": "step time with / without callback (GCN)",
                    "value": f"{st['ratio']:.3f}×",
                    "target": "(no target)",
                    "met": None,
                }
            )
    return rows


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    results = report["results"]
    lines = [
        "# Benchmark results",
        "",
        f"Produced by `python -m benchmarks.run{' --quick' if report['quick'] else ''}` on {report['finished']} "
        f"in {report['duration_s']:.0f} s. Medians, with the interquartile range (IQR) in brackets; every comparison "
        "ran interleaved in one process.",
        "",
        f"**Machine:** {m['cpu_model']}, {m['usable_cpus']} usable of {m['logical_cpus']} logical CPUs, "
        f"{m['memory_gib']} GiB; {m['os']}; Python {m['python']}, torch {m['torch']} "
        f"({m['torch_threads']} intra-op thread{'s' if m['torch_threads'] != 1 else ''}), lightning {m['lightning']}, "
        f"torch_geometric {m['torch_geometric']}, prometheus_client {m['prometheus_client']}, opentelemetry-sdk "
        f"{m['opentelemetry_sdk']}; GPU: {m['cuda_device'] or 'none'}; commit {m['git_commit']}. "
        f"Load average at start {m['load_average']}, at end {report.get('load_average_end')} "
        "(the machine is shared: other work ran at the same time).",
        "",
        "| Benchmark | Figure | Value | Target | Met |",
        "|---|---|---|---|---|",
    ]
    for row in report["summary"]:
        lines.append(
            f"| {row['benchmark']} | {row['figure']} | {row['value']} | {row['target']} | {_mark(row['met'])} |"
        )
    lines += ["", *_details(results)]
    return "\n".join(lines).rstrip() + "\n"


def _details(results: dict[str, Any]) -> list[str]:
    out: list[str] = []
    hooks = results.get("hook_time")
    if hooks:
        c = hooks["config"]
        out += [
            "## Hook time per training step",
            "",
            f"Tiny `Linear(8, 1)` model, batch 32, {c['steps_per_fit']} steps per fit, {c['reps']} fits per case "
            f"interleaved; {c['logger']}; `log_every_n_steps={c['log_every_n_steps']}`. Only hooks a callback "
            f"overrides are timed; the timer's own floor is {c['timer_floor_ns_per_wrapped_call']:.0f} ns per "
            "wrapped call (included in the figures; the net column subtracts it).",
            "",
            "µs / step is the mean over a fit's steps (what the run pays); the median and p99 step show how "
            "that mean splits into a typical step and rare slow ones (traced steps, logging steps, preemption).",
            "",
            "| Case | µs / step (mean) | net µs / step | min–max | median step µs | p99 step µs | "
            "per hook (µs / step) |",
            "|---|---|---|---|---|---|---|",
        ]
        for data in hooks["cases"].values():
            per_hook = ", ".join(
                f"{k.replace('on_', '')}: {v:.1f}" for k, v in data["per_hook_us_per_step"].items() if v >= 0.05
            )
            out.append(
                f"| {data['description']} | {_spread(data['us_per_step'])} | "
                f"{data['net_us_per_step']['median']:.1f} | {data['us_per_step']['min']:.1f}–"
                f"{data['us_per_step']['max']:.1f} | {data['median_step_us']['median']:.1f} | "
                f"{data['p99_step_us']['median']:.1f} | {per_hook} |"
            )
        for case, rows in hooks.get("profiles", {}).items():
            out += [
                "",
                f"cProfile inside the hooks, `{case}` (one extra fit; the profiler inflates absolute times):",
                "",
                "| function | calls / step | own µs / step | cumulative µs / step |",
                "|---|---|---|---|",
            ]
            for row in rows[:12]:
                out.append(
                    f"| `{row['function']}` | {row['calls_per_step']:.2f} | {row['own_us_per_step']:.1f} | "
                    f"{row['cumulative_us_per_step']:.1f} |"
                )
        out.append("")
    breakdown = results.get("breakdown")
    if breakdown:
        out += [
            "## Where the callback's step time goes",
            "",
            "Parts of the step path called in tight loops inside a live fit (median of 7 loop means).",
            "",
            "| Part | µs / call |",
            "|---|---|",
        ]
        for name, value in breakdown["us_per_call"].items():
            out.append(f"| {name} | {value:.2f} |" if value is not None else f"| {name} | n/a |")
        out.append("")
    e2e = results.get("end_to_end")
    if e2e:
        out += [
            "## End-to-end step time",
            "",
            e2e["what"] + ". " + e2e["config"]["timed"] + ".",
            "",
            "| Workload | case | steps timed / fit | ms / step | paired ratio to without | 95% CI | "
            "callback hooks µs / step | per hook µs / step |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, data in e2e["workloads"].items():
            out.append(
                f"| {name}: {data['description']} | without | {data['timed_steps_per_fit']} | "
                f"{_spread(data['step_ms_without'], '{:.2f}')} | — | — | — | — |"
            )
            variants = [("with, all features on", data, data["step_ms_with"])]
            if "tracing_off" in data:
                variants.append(("with, tracing off", data["tracing_off"], data["tracing_off"]["step_ms"]))
            for label, case, step_ms in variants:
                ci = case.get("paired_ratio_ci95")
                per_hook = ", ".join(
                    f"{k.replace('on_', '')}: {v:.1f}" for k, v in case["per_hook_us_per_step"].items()
                )
                out.append(
                    f"| {name} | {label} | {data['timed_steps_per_fit']} | {_spread(step_ms, '{:.2f}')} | "
                    f"{_spread(case['paired_ratio'], '{:.3f}')} (n={case['paired_ratio']['n']}) | "
                    f"{(format(ci[0], '.3f') + '–' + format(ci[1], '.3f')) if ci else '—'} | "
                    f"{_spread(case['callback_hook_us_per_step'])} | {per_hook} |"
                )
        out += [
            "",
            "Epochs alternating inside one fit (pattern without, with, tracing off, tracing off, with, "
            "without per block; ratio per block):",
            "",
            "| Workload | blocks × steps per epoch | ms / step without | with: ratio (95% CI) | "
            "tracing off: ratio (95% CI) | hooks µs / step with / tracing off | background threads, CPU s per s |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, data in e2e["workloads"].items():
            alt = data.get("alternating")
            if not alt:
                continue
            a, b = alt["with"], alt["with_tracing_off"]
            threads = ", ".join(
                f"{k}: {v:.4f}" for k, v in data.get("threads", {}).get("cpu_seconds_per_training_second", {}).items()
            )
            out.append(
                f"| {name} | {alt['blocks']} × {alt['steps_per_epoch']} | "
                f"{_spread(alt['step_ms_without'], '{:.2f}')} | {a['ratio']:.3f} ({_ci(a['ratio_ci95'])}) | "
                f"{b['ratio']:.3f} ({_ci(b['ratio_ci95'])}) | {a['hook_us_per_step']:.1f} / "
                f"{b['hook_us_per_step']:.1f} | {threads} |"
            )
        out.append("")
    scrape = results.get("scrape")
    if scrape:
        out += [
            "## Scrape latency",
            "",
            scrape["what"] + f", {scrape['config']['requests_per_case']} requests per "
            "case, interleaved. In-process columns, without HTTP: prometheus_client's rendering "
            "of the served registry and its collect() share.",
            "",
            "| Case | median ms | IQR | p99 ms | max ms | body bytes | library rendering ms (in-process) | "
            "of which collect() ms |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, data in scrape["cases"].items():
            ms = data["ms"]
            exposition = data.get("exposition_ms")
            in_process = f"{exposition['median']:.2f}" if exposition else "n/a"
            collect = f"{data['collect_ms']['median']:.2f}" if data.get("collect_ms") else "n/a"
            out.append(
                f"| {name} | {ms['median']:.2f} | {ms['q1']:.2f}–{ms['q3']:.2f} | {data['p99_ms']:.2f} | "
                f"{ms['max']:.2f} | {data['body_bytes']} | {in_process} | {collect} |"
            )
        storm = scrape.get("storm")
        if storm and "cases" in storm:
            out += [
                "",
                "### Scrape storm",
                "",
                storm["what"] + f"; {storm['blocks']} blocks, each a quiet period "
                "then a storm for each endpoint (order alternating by block). Ratios are storm over quiet.",
                "",
                "| Endpoint | mean step ms | median step ms (IQR) | ratio of means | ratio of medians | "
                "scrapes answered | scrape latency median / p99 ms |",
                "|---|---|---|---|---|---|---|",
                f"| quiet (no scrapes) | {storm['step_ms_quiet_mean']:.2f} | "
                f"{_spread(storm['step_ms_quiet'], '{:.2f}')} | — | — | — | — |",
            ]
            for name, data in storm["cases"].items():
                p99 = data.get("scrape_p99_ms")
                out.append(
                    f"| {name} | {data['step_ms_storm_mean']:.2f} | "
                    f"{_spread(data['step_ms_storm'], '{:.2f}')} | {data['ratio_mean']:.3f} | "
                    f"{data['ratio_median']:.3f} | {data['scrapes_answered_200']}/{data['scrapes_sent']} | "
                    f"{data['scrape_ms']['median']:.1f} / {p99:.1f} |"
                    if p99 is not None
                    else f"| {name} | {data['step_ms_storm_mean']:.2f} | — | {data['ratio_mean']:.3f} | — | "
                    f"{data['scrapes_answered_200']}/{data['scrapes_sent']} | — |"
                )
        out.append("")
    memory = results.get("memory")
    if memory:
        out += [
            "## Memory",
            "",
            memory["what"] + "; " + memory["config"]["rss"] + ".",
            "",
            "| Run | steps | RSS start → end (MiB) | growth MiB / 100k | fitted slope MiB / 100k |",
            "|---|---|---|---|---|",
        ]
        for key in ("direct", "direct_notrace", "direct_baseline", "trainer", "trainer_baseline"):
            if key in memory:
                d = memory[key]
                start, end = d["samples"][0][1], d["samples"][-1][1]
                out.append(
                    f"| {key} | {d['steps']:,} | {start:.2f} → {end:.2f} | {d['growth_mib_per_100k']:.2f} | "
                    f"{d['slope_mib_per_100k']:.2f} |"
                )
        out.append("")
    run_end = results.get("run_end")
    if run_end:
        out += [
            "## Run end",
            "",
            run_end["what"] + f"; {run_end['config']['reps']} fits per case.",
            "",
            "| Case | seconds | parts of the teardown (median s) |",
            "|---|---|---|",
        ]
        for data in run_end["cases"].values():
            parts = ", ".join(f"{k}: {v:.3f}" for k, v in data["parts_seconds"].items())
            out.append(f"| {data['description']} | {_spread(data['seconds'], '{:.3f}')} | {parts or '—'} |")
        out.append("")
    if "config" in results.get("detection", {}):  # measured (not an error)
        from benchmarks import detection

        out += detection.details(results["detection"])
    return out
