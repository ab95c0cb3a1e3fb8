"""Drives a callback's hooks directly, without a Trainer: enough steps for memory trends in seconds, not hours.

:class:`FakeTrainer` carries only what the hooks read (ranks, step counters, the logging cadence, the logged
values, optimizers, the root device). :func:`drive` calls the training hooks in Lightning's order for each step,
with a fresh loss tensor and fresh logged values each time, as a real run would.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable, Optional

import torch


class FakeTrainer:
    """The attributes of a ``Trainer`` that a callback's training hooks read."""

    global_rank = 0
    local_rank = 0
    node_rank = 0
    world_size = 1
    sanity_checking = False
    log_every_n_steps = 50

    def __init__(self, module: Any) -> None:
        self.current_epoch = 0
        self.global_step = 0
        self.lightning_module = module
        self.optimizers = [torch.optim.SGD(module.parameters(), lr=0.01)]
        self.strategy = SimpleNamespace(root_device=torch.device("cpu"))
        self._logger_connector = SimpleNamespace(should_update_logs=False)
        self.callback_metrics: dict[str, Any] = {}
        self.loggers: list[Any] = []


def graph_batches(count: int = 4, graphs: int = 32, seed: int = 0) -> list[Any]:
    """``count`` PyG ``Batch``\\ es of ``graphs`` small random graphs."""
    from torch_geometric.data import Batch, Data

    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        items = []
        for _ in range(graphs):
            nodes = int(torch.randint(20, 60, (1,), generator=generator))
            edges = nodes * 5
            items.append(Data(x=torch.randn(nodes, 16, generator=generator),
                              edge_index=torch.randint(0, nodes, (2, edges), generator=generator),
                              y=torch.randint(0, 4, (1,), generator=generator)))
        batches.append(Batch.from_data_list(items))
    return batches


def drive(callback: Any, trainer: FakeTrainer, steps: int, batches: list[Any], steps_per_epoch: int = 1000,
          start_step: int = 0, every: Optional[Callable[[int], None]] = None, every_n: int = 0) -> None:
    """Run ``steps`` training steps of hooks (epoch hooks every ``steps_per_epoch``); ``every(step)`` is called
    after every ``every_n`` steps."""
    module = trainer.lightning_module
    optimizer = trainer.optimizers[0]
    for step in range(start_step, start_step + steps):
        index = step % steps_per_epoch
        if index == 0:
            trainer.current_epoch = step // steps_per_epoch
            callback.on_train_epoch_start(trainer, module)
        batch = batches[step % len(batches)]
        callback.on_train_batch_start(trainer, module, batch, index)
        loss = torch.tensor(1.0 / (1 + step % 97), requires_grad=True)
        callback.on_before_backward(trainer, module, loss)
        callback.on_after_backward(trainer, module)
        callback.on_before_optimizer_step(trainer, module, optimizer)
        callback.on_before_zero_grad(trainer, module, optimizer)
        trainer.global_step = step + 1
        logging_step = (step + 1) % trainer.log_every_n_steps == 0
        trainer._logger_connector.should_update_logs = logging_step
        if logging_step:
            trainer.callback_metrics = {"train_loss": loss.detach(), "train_acc": torch.tensor(0.5)}
        callback.on_train_batch_end(trainer, module, {"loss": loss}, batch, index)
        if index == steps_per_epoch - 1:
            callback.on_train_epoch_end(trainer, module)
        if every is not None and every_n and (step + 1 - start_step) % every_n == 0:
            every(step + 1)
