"""What is trained and how: the model's size, its optimizers' learning rates and the labels of
``<namespace>_training_info``. Read at set-up, at epoch ends or at scrape time, never per step.

Example::

    figures, final = count_model(module)  # (parameters, trainable parameters, bytes), lazy layers all sized
    learning_rates(trainer)               # [("AdamW", "0", 0.001)]
    run_info(module, "abc123", "DDPStrategy")
"""

from __future__ import annotations

from typing import Any

import lightning
import torch
import torch_geometric

from dgdn_lightning_monitor.scheduler import info_labels

#: (parameters, trainable parameters, bytes held by parameters and buffers).
ModelFigures = tuple[int, int, int]
#: (optimizer, param_group, lr) of each optimizer parameter group.
LearningRates = list[tuple[str, str, float]]


def count_model(module: torch.nn.Module) -> tuple[ModelFigures, bool]:
    """Count parameters, trainable parameters and bytes of parameters and buffers; also says whether the figures
    are final (no lazily initialised layer still waits for its first batch)."""
    parameters = trainable = memory = 0
    final = True
    for parameter in module.parameters():
        if isinstance(parameter, torch.nn.parameter.UninitializedParameter):
            final = False
            continue
        parameters += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
        memory += parameter.numel() * parameter.element_size()
    for buffer in module.buffers():
        if isinstance(buffer, torch.nn.parameter.UninitializedBuffer):
            final = False
        else:
            memory += buffer.numel() * buffer.element_size()
    return (parameters, trainable, memory), final


def learning_rates(trainer: Any) -> LearningRates:
    """Each optimizer's param-group learning rates; read at scrape time, never per step."""
    rates: LearningRates = []
    optimizers = list(trainer.optimizers)
    names = [type(optimizer).__name__ for optimizer in optimizers]
    for index, optimizer in enumerate(optimizers):
        name = names[index] if names.count(names[index]) == 1 else f"{names[index]}-{index}"
        for group_index, group in enumerate(optimizer.param_groups):
            lr = group.get("lr")
            if isinstance(lr, torch.Tensor):
                if lr.device.type != "cpu" or lr.numel() != 1:
                    continue  # reading a device tensor from the scrape thread would synchronise
                lr = lr.item()
            if isinstance(lr, (int, float)):
                rates.append((name, str(group_index), float(lr)))
    return rates


def run_info(module: torch.nn.Module, run_id: str, strategy: str = "") -> dict[str, str]:
    """The labels of ``<namespace>_training_info``: what is trained, how (the Trainer's strategy class, e.g.
    ``DDPStrategy``), with which library versions, and the scheduler's job
    (:func:`~dgdn_lightning_monitor.scheduler.info_labels`)."""
    model = type(module)
    return {
        "strategy": strategy,
        "model": f"{model.__module__}.{model.__qualname__}",
        "lightning_version": lightning.__version__,
        "torch_version": torch.__version__,
        "torch_geometric_version": torch_geometric.__version__,
        "run_id": run_id,
        **info_labels(),
    }
