"""The constant labels that identify one training process (its rank) on every exported series."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

RANK_LABEL_NAMES: tuple[str, ...] = ("rank", "local_rank", "node_rank", "world_size")
#: The ``job`` of a run's discovered targets and pushed groups: the job the deploy stack's Prometheus scrapes file-SD
#: targets under (``deploy/prometheus/prometheus.yml``).
DEFAULT_JOB = "dgdn-training"


@dataclass(frozen=True)
class RankLabels:
    """Where this process sits in a (possibly distributed) run.

    Args:
        rank: global rank.
        local_rank: rank within its node.
        node_rank: index of its node.
        world_size: number of processes in the run.

    Example::

        RankLabels().as_dict()  # {"rank": "0", "local_rank": "0", "node_rank": "0", "world_size": "1"}
    """

    rank: int = 0
    local_rank: int = 0
    node_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_trainer(cls, trainer: Any) -> RankLabels:
        """Take the ranks Lightning assigned; they are known from the Trainer's ``setup`` on."""
        return cls(
            rank=int(getattr(trainer, "global_rank", 0)),
            local_rank=int(getattr(trainer, "local_rank", 0)),
            node_rank=int(getattr(trainer, "node_rank", 0)),
            world_size=int(getattr(trainer, "world_size", 1)),
        )

    @property
    def values(self) -> tuple[str, ...]:
        return (str(self.rank), str(self.local_rank), str(self.node_rank), str(self.world_size))

    def as_dict(self) -> dict[str, str]:
        return dict(zip(RANK_LABEL_NAMES, self.values))
