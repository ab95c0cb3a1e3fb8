"""A process that runs one short ``fit`` with MonitoringCallback on a given port and then exits, saying when: for the
run-end tests, which scrape it from outside.

Prints ``serving`` once the endpoint serves (every rank), waits until the file ``--go`` exists (the test has
scraped it as often as it wants), prints ``returned <time>`` when ``fit`` has returned and ``exited <time>`` from its
last exit handler (the first registered, so it runs after the callback's), times from ``time.time()``.

    python tests/run_end_child.py --port 9400 --go /tmp/go [--no-wait] [--strategy ddp_fork --devices 2]
"""

from __future__ import annotations

import argparse
import atexit
import time
from pathlib import Path

atexit.register(lambda: print(f"exited {time.time():.3f}", flush=True))

import lightning.pytorch as pl  # noqa: E402
from lit_models import GraphClassifier, graph_loaders, quiet_trainer  # noqa: E402

from dgdn_lightning_monitor import MonitoringCallback  # noqa: E402


class _Go(pl.Callback):
    def __init__(self, go: Path) -> None:
        self.go = go

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        print("serving", flush=True)
        deadline = time.monotonic() + 120
        while not self.go.exists() and time.monotonic() < deadline:
            time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--go", type=Path, required=True)
    parser.add_argument("--no-wait", action="store_true", help="wait_for_final_scrape=False")
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--devices", type=int, default=1)
    args = parser.parse_args()
    monitor = MonitoringCallback(
        port=args.port, addr="127.0.0.1", tracing=False, gpu_devices=None, wait_for_final_scrape=not args.no_wait
    )
    train, val, *_ = graph_loaders()
    trainer = quiet_trainer(
        max_epochs=2, callbacks=[_Go(args.go), monitor], num_sanity_val_steps=0, strategy=args.strategy,
        devices=args.devices,
    )  # fmt: skip
    trainer.fit(GraphClassifier(), train, val)
    print(f"returned {time.time():.3f}", flush=True)


if __name__ == "__main__":
    main()
