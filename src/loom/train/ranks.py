"""Which process of a multi-process training job this is (`accelerate launch`, torchrun).

The launcher sets ``RANK``/``WORLD_SIZE`` before Python starts, so these answer before the
process group exists. Rank 0 alone touches the store and the run folder's summary files.
"""

from __future__ import annotations

import os
import signal
import time

TEST_FAIL_RANK = "LOOM_TEST_FAIL_RANK"
TEST_FAIL_DELAY_S = 5.0


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Rank 0 under `accelerate launch`; only it snapshots data, writes outputs and publishes."""
    return rank() == 0


def world_size() -> int:
    """Processes in this training job (``WORLD_SIZE``); 1 when not launched as a group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def wait_for_all_ranks() -> None:
    """Barrier across the job's processes (the group the Trainer set up); no-op when alone."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def fail_here_for_tests() -> None:
    """Test hook: ``LOOM_TEST_FAIL_RANK=N`` SIGKILLs rank N (no cleanup, as the OOM killer or a
    lost node would) after it trained, before the publish barrier: the last moment a dead rank
    must still stop the adapter from being published. It dies only after TEST_FAIL_DELAY_S, a
    straggler: without the barrier rank 0 publishes meanwhile (tests/test_train_ddp.py)."""
    if os.environ.get(TEST_FAIL_RANK) == str(rank()):
        time.sleep(TEST_FAIL_DELAY_S)
        os.kill(os.getpid(), signal.SIGKILL)


def sharded_launch() -> str | None:
    """ "FSDP" or "ZeRO-3" when `accelerate launch` shards the base model's weights across the
    ranks (the launcher's environment says so), else None."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "FSDP"
    if (
        os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
        and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
    ):
        return "ZeRO-3"
    return None
