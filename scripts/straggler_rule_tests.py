"""Write the promtool unit tests of DGDNRankStraggler (deploy/prometheus/tests/dgdn-straggler.test.yml): 2-rank
synchronous DDP runs at the shipped 5 s scrape interval, each rank's own work jittering, the fast ranks waiting for the
slow one inside backward, with the firing time and rendered ratio computed here independently of Prometheus.

    python scripts/straggler_rule_tests.py            # print the file
    python scripts/straggler_rule_tests.py --write    # rewrite it
    python scripts/straggler_rule_tests.py --check    # exit 1 when it differs from what this script writes
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

OUTPUT = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "tests" / "dgdn-straggler.test.yml"
STEP = 5  # s, the shipped scrape interval


def fmt(x):
    return f"{x:.4f}".rstrip("0").rstrip(".")


def lab(d):
    return ", ".join(f'{k}="{v}"' for k, v in d.items())


def cumulative(per_interval):
    """per-interval increments (None: flat) -> promtool values string."""
    total, out = 0.0, ["0"]
    for inc in per_interval:
        total += inc
        out.append(fmt(total))
    return " ".join(out)


def rank_series(target, info, steps, fetch, forward, backward):
    """steps, fetch, forward, backward: per-interval lists (counts and seconds)."""
    out = []
    for phase, secs in (("data_fetch", fetch), ("forward", forward), ("backward", backward)):
        out.append((f"dgdn_step_phase_seconds_sum{{{lab({**target, 'phase': phase})}}}", cumulative(secs)))
        out.append((f"dgdn_step_phase_seconds_count{{{lab({**target, 'phase': phase})}}}", cumulative(steps)))
    batch = [f + w + b for f, w, b in zip(fetch, forward, backward)]
    out.append((f"dgdn_batch_processing_seconds_sum{{{lab(target)}}}", cumulative(batch)))
    out.append((f"dgdn_batch_processing_seconds_count{{{lab(target)}}}", cumulative(steps)))
    n = len(steps)
    out.append((f"dgdn_training_info{{{lab({**target, **info})}}}", f"1x{n}"))
    return out


def ddp_run(rng, targets, infos, segments, slow=None, spike=None, per_step=False, jitter=0.1):
    """segments: list of (intervals, steps per interval or 0 for no training).
    slow: (rank, from_interval, factor on forward). Each rank's own work jitters by up to +-``jitter`` per interval
    (per step with ``per_step``); the synchronous step time is the slowest rank's own work plus backward."""
    per_rank = {r: ([], [], [], []) for r in range(len(targets))}
    i = 0
    for count, steps in segments:
        for _ in range(count):
            own = []
            for r in range(len(targets)):
                draws = [rng.uniform(-jitter, jitter) for _ in range(steps if per_step else 1)] or [0]
                j = 1 + sum(draws) / len(draws)
                fetch = 0.05 * steps * j
                fwd = 0.15 * steps * j * (slow[2] if slow and r == slow[0] and i >= slow[1] else 1)
                if spike and steps and i == spike[0]:
                    fetch += spike[1][r]
                own.append((fetch, fwd))
            slowest = max(f + w for f, w in own)
            for r, (fetch, fwd) in enumerate(own):
                # the fast ranks wait for the slowest inside backward (the gradient all-reduce)
                bwd = 0.3 * steps + (slowest - fetch - fwd)
                s = per_rank[r]
                s[0].append(steps)
                s[1].append(fetch)
                s[2].append(fwd)
                s[3].append(bwd if steps else 0)
            i += 1
    series = []
    for r, target in enumerate(targets):
        series += rank_series(target, infos[r], *per_rank[r])
    return series


VERSIONS = dict(
    model="gnn.GraphClassifier",
    strategy="DDPStrategy",
    lightning_version="2.5.1",
    torch_version="2.6.0",
    torch_geometric_version="2.6.1",
)


def slurm(job, rank, n):
    t = dict(
        job="dgdn-training",
        instance=f"gpu00{1 + rank // 2}:4100{3 + rank % 2}",
        run_id=f"slurm-{job}",
        rank=str(rank),
        local_rank=str(rank % 2),
        node_rank=str(rank // 2),
        world_size=str(n),
    )
    i = dict(
        exported_run_id=f"slurm-{job}",
        **VERSIONS,
        slurm_job_id=str(job),
        slurm_restart_count="0",
        slurm_partition="gpu",
        slurm_nodelist="gpu[001-002]",
    )
    return t, i


def files(run, port, rank, n):
    t = dict(
        job="dgdn-training",
        instance=f"workstation:{port}",
        run_id=run,
        rank=str(rank),
        local_rank=str(rank),
        node_rank="0",
        world_size=str(n),
    )
    return t, dict(exported_run_id=run, **VERSIONS)


def pod(rank, n):
    name = "gnn-master-0" if rank == 0 else f"gnn-worker-{rank - 1}"
    t = dict(
        job="dgdn-training",
        instance=f"10.4.1.{7 + rank}:8000",
        namespace="ml",
        pod=name,
        container="pytorch",
        run_id="ml-gnn",
        rank=str(rank),
        local_rank="0",
        node_rank=str(rank),
        world_size=str(n),
    )
    i = dict(
        exported_run_id="ml-gnn",
        **VERSIONS,
        k8s_namespace_name="ml",
        k8s_pod_name=name,
        kubeflow_job_name="gnn",
        kubeflow_replica_index=str(rank),
    )
    return t, i


def static_and_file(rank):
    if rank == 0:  # the quick-start target: no run_id on its series; only the info names the run
        t = dict(
            job="dgdn-training",
            instance="host.docker.internal:8000",
            rank="0",
            local_rank="0",
            node_rank="0",
            world_size="2",
        )
        return t, dict(run_id="4f3e2d1c0b0a", **VERSIONS)
    return files("4f3e2d1c0b0a", 41240, 1, 2)


def condition(series, onset, fast, slow):
    """Independently of Prometheus: the first evaluation after ``onset`` at which the slow rank's mean own work
    over the last 20 s is >= 1.1 times the fast rank's, under both window conventions (closed on the left, as
    Prometheus 2; open, as 3), and the rendered ratio at each evaluation (the same under both)."""

    def cum(instance, name, phase):
        for s, v in series:
            if name in s and f'instance="{instance}"' in s and f'phase="{phase}"' in s:
                return [float(x) for x in v.split()]

    own = {i: [a + b for a, b in zip(cum(i, "_sum", "data_fetch"), cum(i, "_sum", "forward"))] for i in (fast, slow)}
    count = {i: cum(i, "_count", "forward") for i in (fast, slow)}
    first, rendered = None, {}
    for k in range(len(own[fast])):
        t = k * STEP
        values = []
        for lo in (k - 4, k - 3):  # closed, open
            lo = max(lo, 0)
            if lo == k:
                break
            mean = {i: (own[i][k] - own[i][lo]) / (count[i][k] - count[i][lo]) for i in own}
            values.append(mean[slow] / mean[fast])
        if len(values) < 2:
            continue
        if t > onset and first is None and min(values) >= 1.1:
            first = t
        if (first is None) != (max(values) < 1.1):
            continue  # the two conventions disagree: not checked here
        texts = {f"{v:.2g}" for v in values}  # the description's printf "%.2g"
        if len(texts) == 1:
            rendered[t] = texts.pop()
    return first, rendered


def hms(seconds):
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s}s" if s else f"{m}m"


def alert_labels(target):
    return {
        k: target[k]
        for k in (
            "job",
            "instance",
            "namespace",
            "pod",
            "container",
            "run_id",
            "rank",
            "local_rank",
            "node_rank",
            "world_size",
        )
        if k in target
    }


def emit_case(name, series, checks, out):
    out.append(f"- name: '{name}'")
    out.append(f"  interval: {STEP}s")
    out.append("  input_series:")
    for s, v in series:
        out.append(f"  - series: {s}")
        out.append(f"    values: '{v}'")
    out.append("  alert_rule_test:")
    for t, firing in checks:
        out.append(f"  - eval_time: {hms(t)}")
        out.append("    alertname: DGDNRankStraggler")
        if not firing:
            out.append("    exp_alerts: []")
            continue
        out.append("    exp_alerts:")
        for target, ratio, run in firing:
            out.append("    - exp_labels:")
            for k, v in {**alert_labels(target), "run_id": run, "severity": "warning"}.items():
                out.append(f"        {k}: '{v}'")
            out.append("      exp_annotations:")
            out.append(f"        summary: Rank {target['rank']} of run {run} is a straggler")
            out.append(
                f"        description: Rank {target['rank']} ({target['instance']}) spends {ratio} times as long on"
                f" data fetch plus forward per step as the other ranks of run {run} on average; every synchronous"
                " step waits for it. Check that rank's GPU (clocks, temperature), host load and data shard."
            )


HEADER = """# Unit tests of DGDNRankStraggler (rules/dgdn-alerts.yml, group dgdn-ranks) at the shipped scrape
# and evaluation interval of the training targets, 5 s: a rank made 1.3 times slower in
# synchronous DDP is flagged within 20 steps of its onset plus the rule's `for:`; healthy runs whose
# ranks jitter by +-10% every scrape interval, through a long validation, a checkpoint save and a
# fit followed by a test, never are; nor are the ranks of one run compared with another run of
# the same job. Written by scripts/straggler_rule_tests.py; run with:
#   promtool test rules deploy/prometheus/tests/dgdn-straggler.test.yml
#
# The series are those of real runs: every step traced (trace_every_n_steps=1), each rank's own
# work (data_fetch + forward) jittering by up to +-10% per 5 s, the fast ranks waiting for the slow
# one inside backward (the gradient all-reduce), every label of the deployment (SLURM, file
# discovery, a PodMonitor, the static quick-start target; see dgdn-alerts.test.yml). promtool only
# reports firing alerts, so `exp_alerts: []` before `for:` has elapsed checks that the alert waits;
# checks are placed at least one evaluation away from the time their outcome changes.

rule_files:
- ../rules/dgdn-alerts.yml
evaluation_interval: 5s
tests:
"""


def main() -> str:
    out = [HEADER.rstrip("\n")]
    rng = random.Random(20250611)
    # A: 1 s steps (5 per interval), onset at 5m (interval 60), 40 intervals after.
    onset = 60
    targets = [slurm(81750, r, 2) for r in range(2)]
    series = ddp_run(
        rng, [t for t, _ in targets], [i for _, i in targets], [(onset + 36, 5)], slow=(1, onset, 1.3), per_step=True
    )
    t0 = onset * STEP
    first, rendered = condition(series, t0, "gpu001:41003", "gpu001:41004")
    assert first <= t0 + 15, first  # flagged within 20 steps (1 s each), an evaluation to spare
    late = t0 + 20 + 60  # 20 steps and for:
    checks = [
        (t0 - 5, []),
        (t0 + 55, []),
        (late, [(targets[1][0], rendered[late], "slurm-81750")]),
        *[(t, [(targets[1][0], rendered[t], "slurm-81750")]) for t in sorted(rendered) if t > late + 60][:1],
    ]
    emit_case(
        "2 ranks in synchronous DDP, 1 s steps: a rank 1.3 times slower is flagged 20 steps plus for: after its onset",
        series,
        checks,
        out,
    )
    # B: healthy runs, 0.5 s steps (10 per interval): train 5m, validation 15m, train 3m with a checkpoint save of
    # 2m (no steps) then train 3m, then test 10m. After the validation, the first step's fetch (loader workers
    # starting) takes 2 s longer on rank 1 and 0.5 s on rank 0.
    segs = [(60, 10), (180, 0), (36, 10), (24, 0), (36, 10), (120, 0)]
    series = []
    for make in (lambda r: files("c0ffee123456", 41250 + r, r, 2), lambda r: pod(r, 2), static_and_file):
        targets = [make(r) for r in range(2)]
        series += ddp_run(rng, [t for t, _ in targets], [i for _, i in targets], segs, spike=(241, (0.5, 2.0)))
    total = sum(n for n, _ in segs) * STEP
    checks = [(t, []) for t in range(60, total + 1, 30)]
    emit_case(
        "healthy 2-rank runs with +-10% jitter, a 15-minute validation, a checkpoint save, fit then test: never"
        " flagged",
        series,
        checks,
        out,
    )
    # C: runs of one job are never compared: a 2-rank run whose ranks are equal (no jitter) and a single-rank run
    # 1.3 times slower than them, both 1 s steps. Compared by job alone, the single rank would be a straggler.
    series = []
    targets = [files("a1b2c3d4e5f6", 41260 + r, r, 2) for r in range(2)]
    series += ddp_run(rng, [t for t, _ in targets], [i for _, i in targets], [(120, 5)], per_step=True, jitter=0)
    single, info = slurm(81753, 0, 1)
    series += ddp_run(rng, [single], [info], [(120, 5)], slow=(0, 0, 1.3), per_step=True, jitter=0)
    checks = [(t, []) for t in range(60, 120 * STEP + 1, 30)]
    emit_case(
        "a 2-rank run with equal ranks and a single-rank run 1.3 times slower, one job: neither is flagged",
        series,
        checks,
        out,
    )
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help=f"rewrite {OUTPUT.name}")
    action.add_argument("--check", action="store_true", help=f"exit 1 when {OUTPUT.name} is stale")
    args = parser.parse_args()
    text = main()
    if args.write:
        OUTPUT.write_text(text)
    elif args.check:
        if OUTPUT.read_text() != text:
            sys.exit(f"{OUTPUT} is stale: run python scripts/straggler_rule_tests.py --write")
    else:
        sys.stdout.write(text)
