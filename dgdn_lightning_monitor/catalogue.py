"""The catalogue of every metric family the callback exports: name, type, unit, labels and meaning, in one place.

The Prometheus collectors take their HELP text from here, the documentation's metrics table
(``docs/metrics.md``) is rendered from it (``python scripts/metrics_catalogue.py --write``), and the tests and
the dashboard's checks read it. Names are given after the namespace (``dgdn`` by default); every series also
carries the rank labels (``RANK_LABEL_NAMES`` of :mod:`dgdn_lightning_monitor.labels`), which are not repeated here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

#: The Prometheus types of a family.
TYPES = ("gauge", "counter", "histogram", "info")


@dataclass(frozen=True)
class Family:
    """One metric family.

    Args:
        name: the name after the namespace, as exposed (a counter's with ``_total``; an info's without ``_info``).
        type: ``gauge``, ``counter``, ``histogram`` or ``info``.
        unit: what one unit of its value is (a base unit where the name ends in one), ``""`` for none.
        labels: the labels beyond the rank labels that a series may carry.
        help: the HELP line Prometheus shows.
        meaning: what it measures, for the documentation (Markdown).
        labels_note: the documentation's cell for the labels, when they need more words than their names.
    """

    name: str
    type: str
    unit: str
    labels: tuple[str, ...]
    help: str
    meaning: str
    labels_note: str = ""

    def exposed(self, namespace: str = "dgdn") -> str:
        """The family's full name as ``/metrics`` exposes it (an info family's ends in ``_info``)."""
        return f"{namespace}_{self.name}" + ("_info" if self.type == "info" else "")

    def series(self, namespace: str = "dgdn") -> tuple[str, ...]:
        """The names of the series the family exposes (a histogram's buckets, sum and count)."""
        name = self.exposed(namespace)
        if self.type == "histogram":
            return tuple(name + suffix for suffix in ("_bucket", "_sum", "_count"))
        return (name,)


FAMILIES: tuple[Family, ...] = (
    Family(
        "training_loss",
        "gauge",
        "",
        (),
        help="Last logged training loss.",
        meaning="last logged training loss (`train_loss`); NaN is shown as NaN",
    ),
    Family(
        "validation_loss",
        "gauge",
        "",
        ("dataloader",),
        help="Last logged validation loss.",
        meaning=(
            'last logged validation loss (`val_loss`); with several loaders one series per loader (`"0"`, `"1"`, …)'
        ),
        labels_note="`dataloader` with several validation loaders",
    ),
    Family(
        "training_accuracy",
        "gauge",
        "ratio",
        (),
        help="Last logged training accuracy (ratio).",
        meaning="last logged training accuracy (`train_acc`)",
    ),
    Family(
        "validation_accuracy",
        "gauge",
        "ratio",
        ("dataloader",),
        help="Last logged validation accuracy (ratio).",
        meaning="last logged validation accuracy (`val_acc`)",
        labels_note="`dataloader` with several validation loaders",
    ),
    Family(
        "samples_processed_total",
        "counter",
        "samples",
        (),
        help="Training samples processed (graphs, seed nodes, seed edges, events or rows).",
        meaning=(
            "training samples, as the loader defines them (see [What counts as a sample](#what-counts-as-a-sample) "
            "below): graphs, seed nodes, seed edges (without negatives), nodes of an unseeded subgraph, events, rows"
        ),
    ),
    Family(
        "nodes_processed_total",
        "counter",
        "nodes",
        (),
        help="Nodes in processed training batches.",
        meaning="nodes in training batches",
    ),
    Family(
        "edges_processed_total",
        "counter",
        "edges",
        (),
        help="Edges (events) in processed training batches.",
        meaning="edges (events of `TemporalData`) in training batches",
    ),
    Family(
        "nonfinite_loss_total",
        "counter",
        "losses",
        (),
        help="Training losses that were NaN or infinite.",
        meaning=(
            "training steps whose loss was NaN or ±inf: the loss `training_step` returned, or, when it returns none "
            "(manual optimisation), the logged `train_loss`"
        ),
    ),
    Family(
        "sampled_nodes_total",
        "counter",
        "nodes",
        ("hop",),
        help="Nodes a neighbour sampler drew for training batches, per hop (0: seeds).",
        meaning=(
            "nodes a neighbour sampler (`NeighborLoader`, `LinkNeighborLoader`) drew for training batches, per hop: "
            '`hop="0"` the seed nodes (for link batches the ends of the seed edges and negatives), `"1"`… the new nodes'
            " each hop found; summed over node types for `HeteroData`; per batch and hop (see below) it is the figure "
            "`num_neighbors` tunes"
        ),
    ),
    Family(
        "sampled_edges_total",
        "counter",
        "edges",
        ("hop",),
        help="Edges a neighbour sampler drew for training batches, per hop.",
        meaning='edges a neighbour sampler drew for training batches, per hop from `hop="1"`; summed over edge types',
    ),
    Family(
        "nonfinite_loss_streak",
        "gauge",
        "losses",
        (),
        help="Consecutive training losses up to the last counted one that were NaN or infinite.",
        meaning=(
            "consecutive NaN/±inf training losses up to the last counted one (0 after a finite one); counted with "
            "`dgdn_nonfinite_loss_total`, every 50 steps and at epoch ends"
        ),
    ),
    Family(
        "training_loss_min",
        "gauge",
        "",
        (),
        help="Lowest finite training loss logged in this run.",
        meaning="lowest finite training loss logged in this run",
    ),
    Family(
        "training_loss_max",
        "gauge",
        "",
        (),
        help="Highest finite training loss logged in this run.",
        meaning="highest finite training loss logged in this run",
    ),
    Family(
        "validation_evaluations_since_best",
        "gauge",
        "evaluations",
        (),
        help=(
            "Validation evaluations of this run since the one with the lowest validation loss (0: the last was best)."
        ),
        meaning=(
            "validation evaluations of this run since the one with the lowest `val_loss` (0: the last one was the best)"
        ),
    ),
    Family(
        "graph_nodes",
        "gauge",
        "nodes",
        (),
        help="Nodes in the last training batch.",
        meaning="nodes in the last training batch",
    ),
    Family(
        "graph_edges",
        "gauge",
        "edges",
        (),
        help="Edges (events) in the last training batch.",
        meaning="edges in the last training batch",
    ),
    Family(
        "samples_per_second",
        "gauge",
        "samples/s",
        (),
        help="Training throughput over the recent batches.",
        meaning="training throughput over the last `throughput_window` batches (data loading included)",
    ),
    Family(
        "batch_processing_seconds",
        "histogram",
        "seconds",
        (),
        help="Wall time of one training batch.",
        meaning=(
            "wall time of a training batch, from `on_train_batch_start` to `on_train_batch_end`; traced batches carry a"
            " `trace_id` exemplar"
        ),
    ),
    Family(
        "step_phase_seconds",
        "histogram",
        "seconds",
        ("phase",),
        help="Time of each phase of sampled training steps (device time on CUDA).",
        meaning=(
            "time of each phase of traced training steps (one in `trace_every_n_steps`, each run's first, and at least "
            "one every `trace_floor_s`, 10 s): `data_fetch` (the wait for the next batch), `forward`, `backward`, "
            "`optimizer_step`; on CUDA the last three are device times from CUDA events, read once complete"
        ),
    ),
    Family(
        "epoch_duration_seconds",
        "gauge",
        "seconds",
        (),
        help="Wall time of the last finished training epoch.",
        meaning="wall time of the last finished training epoch",
    ),
    Family(
        "inference_time_seconds",
        "histogram",
        "seconds",
        ("stage",),
        help="Per-sample latency of validation, test and predict batches.",
        meaning="per-sample latency of validation (`validate`), `test` and `predict` batches",
    ),
    Family(
        "model_parameters",
        "gauge",
        "parameters",
        (),
        help="Parameters of the model.",
        meaning="parameters of the model",
    ),
    Family(
        "model_trainable_parameters",
        "gauge",
        "parameters",
        (),
        help="Parameters that require gradients.",
        meaning="parameters that require gradients",
    ),
    Family(
        "model_memory_usage_bytes",
        "gauge",
        "bytes",
        (),
        help="Bytes held by the model's parameters and buffers.",
        meaning="bytes of parameters and buffers",
    ),
    Family(
        "epoch",
        "gauge",
        "",
        (),
        help="Current training epoch (0-based).",
        meaning="current epoch (0-based)",
    ),
    Family(
        "global_step",
        "gauge",
        "steps",
        (),
        help="Optimizer steps taken so far.",
        meaning="optimizer steps so far",
    ),
    Family(
        "learning_rate",
        "gauge",
        "",
        (
            "optimizer",
            "param_group",
        ),
        help="Learning rate of each optimizer parameter group.",
        meaning="learning rate of each optimizer parameter group",
    ),
    Family(
        "last_step_timestamp_seconds",
        "gauge",
        "seconds",
        (),
        help="Unix time at which the last training batch finished.",
        meaning="Unix time of the last finished training batch",
    ),
    Family(
        "run_outcome",
        "gauge",
        "",
        (
            "outcome",
            "exception",
            "reason",
        ),
        help=(
            "1 for the run's current outcome (running, completed, failed, interrupted, terminated), 0 for the others; "
            "reason: why a scheduler terminated it."
        ),
        meaning=(
            "one series per outcome, 1 for the current one: `running` from set-up, then `completed`, `failed` "
            "(`exception`: its class name), `interrupted` (Ctrl-C) or `terminated` (SIGTERM, Lightning's "
            "`SIGTERMException`; `reason`: why SLURM ended the job, `time_limit`, `requeued` or `cancelled`); see [Run "
            "lifecycle](../deploy/README.md#run-lifecycle)"
        ),
    ),
    Family(
        "progress_total",
        "counter",
        "events",
        ("stage",),
        help=(
            "Units of progress by stage: training steps, validation/test/predict/sanity-check batches, checkpoint "
            "saves."
        ),
        meaning=(
            "progress in each stage: training steps (`train`), batches of `validate`, `test`, `predict` and "
            "`sanity_check`, checkpoint saves (`checkpoint`); the liveness alerts' signal"
        ),
    ),
    Family(
        "progress_ratio",
        "gauge",
        "ratio",
        ("stage",),
        help=(
            "Fraction of the run done of its known total (0-1); stage: train for a fit, validate, test or predict for "
            "an evaluation run."
        ),
        meaning=(
            "how far the current run is, one series, `stage` naming what it counts: a fit (`train`) its optimizer "
            "steps of `trainer.estimated_stepping_batches` (the lower of `max_epochs` and `max_steps`, after "
            "`limit_train_batches` and gradient accumulation), or the share of `max_time` used when that ends it "
            "first; an evaluation run (`validate`, `test`, `predict`) its batches of the stage's batches. Absent when "
            "nothing bounds the run (`max_epochs=-1` without `max_steps` or `max_time`, a loader without length); "
            "after the run its last value stays"
        ),
        labels_note="`stage`: `train` (a fit), `validate`, `test` or `predict`",
    ),
    Family(
        "eta_seconds",
        "gauge",
        "seconds",
        ("stage",),
        help="Estimated seconds until the run ends; stage as in progress_ratio.",
        meaning=(
            "estimated time left of the current run: a fit's remaining batches at the recent batch rate (the "
            "throughput window, validation time taken out), plus, once a validation pass ran, the passes still to "
            "come (spaced as so far) at their mean duration; the time `max_time` leaves (plus one validation pass) "
            "when that ends the fit first. An evaluation run's remaining batches at its mean rate. Absent when "
            "nothing bounds the run, before two training batches gave a rate, and after the run"
        ),
        labels_note="`stage`, as `progress_ratio`",
    ),
    Family(
        "last_progress_timestamp_seconds",
        "gauge",
        "seconds",
        (),
        help="Unix time of the last progress in any stage.",
        meaning="Unix time of the last progress in any stage (for stall alerts)",
    ),
    Family(
        "run_start_timestamp_seconds",
        "gauge",
        "seconds",
        (),
        help="Unix time at which the current run (fit, validate, test...) set up.",
        meaning="Unix time at which the current `fit`/`validate`/`test`/`predict` set up",
    ),
    Family(
        "stage_start_timestamp_seconds",
        "gauge",
        "seconds",
        (),
        help="Unix time at which the current stage began.",
        meaning="Unix time at which the current stage began",
    ),
    Family(
        "stage",
        "gauge",
        "",
        ("stage",),
        help="1 for the stage the run is in now, 0 for the others.",
        meaning=(
            "1 for the current stage (`idle`, `sanity_check`, `train`, `validate`, `test`, `predict`), 0 for the others"
        ),
    ),
    Family(
        "stage_seconds_total",
        "counter",
        "seconds",
        ("stage",),
        help="Wall time spent in each stage.",
        meaning="wall time spent in each stage (throughput per second of training)",
    ),
    Family(
        "time_seconds_total",
        "counter",
        "seconds",
        ("category",),
        help="Wall time of this rank since set-up, by category (exactly one at any moment).",
        meaning=(
            "where each second of the run went: `setup`, `sanity_check`, `data_wait`, `forward`, `backward`, "
            "`optimizer_step` (each step's compute, split by the sampled steps' phases), `validation`, `checkpoint`, "
            "`between_steps`, `stall` (past the stall threshold without progress), `lost_progress` (a previous "
            "attempt's time after its last checkpoint); they sum to the wall time"
        ),
    ),
    Family(
        "goodput_ratio",
        "gauge",
        "ratio",
        (),
        help="Share of the wall time spent in the training steps' compute (forward, backward, optimizer step).",
        meaning="the steps' compute over the wall time since set-up (carried over resumed attempts)",
    ),
    Family(
        "bottleneck",
        "gauge",
        "",
        ("cause",),
        help="1 for the cause that limits this rank's training now, 0 for the others.",
        meaning=(
            "the verdict over the recent window ([the rule](where-the-time-goes.md#the-verdict)): `compute` "
            "(healthy), `input`, `sampling`, `host_to_device`, `validation`, `checkpoint`, `between_steps`, "
            "`straggler` (DDP: this rank is slower than its peers, or waits for the slowest), `stall`; 20 % share to "
            "name a cause, hysteresis against flicker"
        ),
    ),
    Family(
        "stall_dumps_total",
        "counter",
        "dumps",
        (),
        help="Stack dumps written because the run made no progress for stall_dump_after_s.",
        meaning=(
            "stack dumps written because the run made no progress in any stage for `stall_dump_after_s` (see [A run "
            "that hangs](troubleshooting.md#a-run-that-hangs))"
        ),
    ),
    Family(
        "stall_threshold_seconds",
        "gauge",
        "seconds",
        ("stage",),
        help="Seconds without progress after which the stall watchdog writes a stack dump, by stage.",
        meaning=(
            "seconds without progress after which the stall watchdog writes a stack dump: with "
            '`stall_dump_after_s="auto"` for the current stage the threshold in force now (600 s for its first '
            "unit), for the others (and `checkpoint`: from a checkpoint save to the next progress) the one learned "
            "from their intervals; `stall_dump_after_s` when fixed (see [A run that "
            "hangs](troubleshooting.md#a-run-that-hangs)); absent when the watchdog is off"
        ),
        labels_note="`stage`: every stage of `stage`, and `checkpoint`",
    ),
    Family(
        "oom_total",
        "counter",
        "errors",
        (),
        help="Out-of-memory errors raised by a step of this process.",
        meaning="out-of-memory errors (`torch.OutOfMemoryError`, `MemoryError`) raised by a step of this process",
    ),
    Family(
        "batch_capacity_nodes",
        "gauge",
        "nodes",
        (),
        help="Estimated nodes of the largest batch that fits the device (linear fit).",
        meaning=(
            "CUDA: estimated nodes of the largest batch that fits the device (a linear fit; see [How large a batch "
            "fits](troubleshooting.md#how-large-a-batch-fits))"
        ),
    ),
    Family(
        "batch_capacity_edges",
        "gauge",
        "edges",
        (),
        help="Estimated edges of the largest batch that fits the device (linear fit).",
        meaning="CUDA: estimated edges of that batch, at the recent edges-per-node ratio",
    ),
    Family(
        "training",
        "info",
        "",
        (
            "strategy",
            "model",
            "lightning_version",
            "torch_version",
            "torch_geometric_version",
            "run_id",
            "slurm_job_id",
            "slurm_array_job_id",
            "slurm_array_task_id",
            "slurm_restart_count",
            "slurm_partition",
            "slurm_nodelist",
            "k8s_namespace_name",
            "k8s_pod_name",
            "kubeflow_job_name",
            "kubeflow_replica_index",
        ),
        help="Model and library versions of this training run.",
        meaning=(
            "what is being trained, always 1; the scheduler's labels name the job for `scontrol`/`sacct` or `kubectl` "
            "([SLURM](slurm.md), [Kubernetes](kubernetes.md))"
        ),
        labels_note=(
            "`strategy` (the Trainer's strategy class), `model`, `lightning_version`, `torch_version`, "
            "`torch_geometric_version`, `run_id`; under SLURM `slurm_job_id`, `slurm_array_job_id`, "
            "`slurm_array_task_id`, `slurm_restart_count`, `slurm_partition`, `slurm_nodelist`; on Kubernetes "
            "`k8s_namespace_name`, `k8s_pod_name`, `kubeflow_job_name`, `kubeflow_replica_index`"
        ),
    ),
    Family(
        "monitor_errors_total",
        "counter",
        "errors",
        ("part",),
        help="Errors the monitor degraded on (it skipped what it could not measure), by part.",
        meaning=(
            "errors the monitor degraded on, by part: `graph_size` (sizing a batch), `metrics` (a hook's figures), "
            "`tracing` (building or exporting spans), `gpu` (NVML or allocator reads), `discovery` (the file-SD file), "
            "`push` (the final push), `exchange` (the set-up exchange between ranks), `watchdog` (writing stall dumps),"
            " `memory` (out-of-memory records, the memory snapshot, capacity sampling); every part from 0; the first "
            "error of each part is warned in the log with its cause; each part degrades alone: a batch that cannot be "
            "sized still counts its step, its progress and its time"
        ),
    ),
    Family(
        "gpu_memory_allocated_bytes",
        "gauge",
        "bytes",
        ("gpu",),
        help="Memory held by tensors in this process's PyTorch CUDA caching allocator.",
        meaning=(
            "memory held by tensors now (PyTorch caching allocator, read at each scrape without synchronising); what "
            "`DGDNGPUMemoryHigh` watches"
        ),
    ),
    Family(
        "gpu_memory_reserved_bytes",
        "gauge",
        "bytes",
        ("gpu",),
        help="Memory reserved by this process's PyTorch CUDA caching allocator (held by tensors plus cached).",
        meaning="memory reserved by the caching allocator",
    ),
    Family(
        "gpu_max_memory_allocated_bytes",
        "gauge",
        "bytes",
        ("gpu",),
        help=(
            "Peak memory held by tensors in this process's PyTorch CUDA caching allocator since start or the last peak "
            "reset."
        ),
        meaning=(
            "peak of `allocated` since the process started (or your last reset; the callback's own sampled resets are "
            "undone)"
        ),
    ),
    Family(
        "gpu_utilization_ratio",
        "gauge",
        "ratio",
        (
            "gpu",
            "uuid",
            "name",
        ),
        help="Fraction of the last NVML sample period during which a kernel ran on the GPU (0 to 1).",
        meaning="NVML: fraction of the last sample period a kernel ran (0–1)",
    ),
    Family(
        "gpu_memory_used_bytes",
        "gauge",
        "bytes",
        (
            "gpu",
            "uuid",
            "name",
        ),
        help="GPU memory in use by all processes on the device, as reported by NVML.",
        meaning="NVML: device memory in use (all processes)",
    ),
    Family(
        "gpu_memory_total_bytes",
        "gauge",
        "bytes",
        (
            "gpu",
            "uuid",
            "name",
        ),
        help="Total GPU memory of the device, as reported by NVML.",
        meaning="NVML: device memory",
    ),
    Family(
        "gpu_temperature_celsius",
        "gauge",
        "celsius",
        (
            "gpu",
            "uuid",
            "name",
        ),
        help="GPU core temperature, as reported by NVML.",
        meaning="NVML: GPU core temperature",
    ),
    Family(
        "gpu_power_watts",
        "gauge",
        "watts",
        (
            "gpu",
            "uuid",
            "name",
        ),
        help="GPU power draw, as reported by NVML.",
        meaning="NVML: power draw",
    ),
    Family(
        "gpu_monitoring_up",
        "gauge",
        "",
        (),
        help="1 while NVML sampling of the GPUs this rank watches works, 0 when it failed or NVML is unavailable.",
        meaning="1 while NVML sampling works, 0 after it failed (only when a GPU is watched)",
    ),
)

#: The families by name (after the namespace).
BY_NAME: dict[str, Family] = {family.name: family for family in FAMILIES}

#: Families the GPU collector exports (``gpu.py``); the others come from the training collector (``metrics.py``).
GPU_FAMILIES: tuple[Family, ...] = tuple(family for family in FAMILIES if family.name.startswith("gpu_"))
TRAINING_FAMILIES: tuple[Family, ...] = tuple(family for family in FAMILIES if not family.name.startswith("gpu_"))


def help_text(name: str) -> str:
    """The HELP line of the family ``name`` (after the namespace)."""
    return BY_NAME[name].help


def markdown_table(families: Iterable[Family] = FAMILIES, namespace: str = "dgdn") -> str:
    """The documentation's metrics table: one row per family, in catalogue order."""
    rows = ["| name | type | unit | extra labels | meaning |", "|---|---|---|---|---|"]
    for family in families:
        labels = family.labels_note or ", ".join(f"`{label}`" for label in family.labels)
        cells = (f"`{family.exposed(namespace)}`", family.type, family.unit or "–", labels, family.meaning)
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"
