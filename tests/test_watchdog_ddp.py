"""A real two-rank gloo DDP run that hangs: rank 0 enters an all_reduce rank 1 skips (rank 1 then waits in a
collective of its own). Each rank's watchdog writes its stack dump, with the frame it waits in, and the flight
recorder's trace of the collectives, which PyTorch records for gloo too when ``TORCH_FR_BUFFER_SIZE`` is set."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from test_distributed_ddp import clean_env, runs

pytestmark = pytest.mark.slow

WAITS_IN = {0: "enter_collective_alone", 1: "skip_the_collective"}  # tests/ddp_train.py


def test_a_collective_one_rank_never_enters_is_dumped_on_both_ranks(tmp_path: Path) -> None:
    dumps = tmp_path / "dgdn-dumps"  # ddp_train.py trains with default_root_dir=--out and no logger

    def written() -> dict[int, Path]:
        found = {rank: sorted(dumps.glob(f"stall-*-rank{rank}.txt")) for rank in (0, 1)}
        return {rank: paths[-1] for rank, paths in found.items() if paths}

    with runs(tmp_path) as group:
        # The default process-group timeout (30 min) keeps both ranks waiting well past the dump.
        group.start("--strategy", "ddp", "--devices", "2", "--stall-rank", "1", "--stall-dump-after-s", "3",
                    env=clean_env(TORCH_FR_BUFFER_SIZE="64"))
        group.wait_for("a stall dump of each rank", lambda: len(written()) == 2
                       and all((dumps / "flight-recorder-1" / f"rank_{rank}").exists() for rank in (0, 1)))
        logs = group.logs()
    for rank, path in written().items():
        text = path.read_text()
        assert text.startswith(f"Stall dump of rank {rank} ")
        assert f"in {WAITS_IN[rank]}\n" in text  # the blocking frame
        assert "torch.distributed.all_reduce" in text and "in training_step\n" in text
        assert f"No progress for 3 s on rank {rank}: wrote the stack of every thread to {path}" in logs
        trace = pickle.loads((dumps / "flight-recorder-1" / f"rank_{rank}").read_bytes())
        last = trace["entries"][-1]  # the collective this rank waits in, with the Python frames that entered it
        assert last["profiling_name"] == "gloo:all_reduce"
        assert WAITS_IN[rank] in [frame["name"] for frame in last["frames"]]
        status = trace["pg_status"][last["process_group"][0]]
        assert status["last_completed_collective"] < last["collective_seq_id"]  # it never completed
