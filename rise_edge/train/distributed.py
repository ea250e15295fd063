"""Process-group plumbing for `torchrun`: who am I, sum across ranks, share objects from rank 0.

How long a rank waits for rank 0 at the start: rank 0 alone builds the splits, which checks every
image of the data set the first time (rise_edge.data.image_checks); on DomainNet (about 600,000
files) that can take longer than NCCL's 10 minutes. The other ranks wait for it in `share`, on a
CPU (gloo) group of its own whose timeout is $RISE_EDGE_START_TIMEOUT seconds (default 4 hours);
the training's collectives keep the backend's own timeout.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from rise_edge.errors import UserError

START_TIMEOUT_ENV = "RISE_EDGE_START_TIMEOUT"
# 4 hours: DomainNet's ~600,000 images at 24 ms each (40x the measured decode of a PACS image,
# docs/data.md), for slow network storage. Waiting ranks are idle, and torchrun stops them as soon as
# rank 0 fails, so a long limit costs nothing on a healthy start; it only bounds a rank 0 that hangs.
DEFAULT_START_TIMEOUT_S = 4 * 3600
_MAX_START_TIMEOUT_S = 30 * 24 * 3600  # beyond this a typo, not a plan (and timedelta's range)


def start_timeout() -> timedelta:
    """How long ranks wait for rank 0's start (the image check): $RISE_EDGE_START_TIMEOUT seconds,
    else DEFAULT_START_TIMEOUT_S."""
    text = os.environ.get(START_TIMEOUT_ENV, "").strip()
    if not text:
        return timedelta(seconds=DEFAULT_START_TIMEOUT_S)
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= _MAX_START_TIMEOUT_S:  # also refuses nan
        raise UserError(f"{START_TIMEOUT_ENV}={text!r}: give the seconds the other ranks may wait "
                        f"for rank 0's image check, a number above 0 and at most "
                        f"{_MAX_START_TIMEOUT_S} (default {DEFAULT_START_TIMEOUT_S})")
    return timedelta(seconds=seconds)


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # The CPU group `share` waits on, with the start timeout (None: the default group).
    start_group: Any = field(default=None, compare=False, repr=False)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_type: str) -> Distributed:
        """Join the process group torchrun describes in the environment (a no-op for one process),
        and make the start group `share` waits on."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        timeout = start_timeout()  # a bad value stops every rank before anything waits
        if device_type == "cuda":
            # Before the process group: NCCL binds each rank to the current device when it starts,
            # and without this every rank would start on GPU 0.
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        # Why a group of its own rather than a longer timeout on the process group: NCCL's watchdog
        # timeout is what turns a hung collective in training (a stuck rank, mismatched calls) into
        # an error within minutes; raised to hours for a one-time wait, every real hang would hold
        # the GPUs for hours. Why gloo: waiting in a CPU collective holds no NCCL work the watchdog
        # could time out, and needs no shared file system (as a file rank 0 writes would) nor a
        # change to who checks the images. Every rank makes it here, as new_group requires.
        group = dist.new_group(backend="gloo", timeout=timeout)
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                   group)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of a list of numbers over all ranks (float64 so counts stay exact)."""
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()
        dist.all_reduce(tensor)
        return tensor.cpu().tolist()

    def share(self, obj: Any) -> Any:
        """Rank 0's object on every rank (our own data between our own processes). The others wait
        for it up to the start timeout: rank 0 may be checking every image of the data set."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.start_group)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()  # the start group with it
