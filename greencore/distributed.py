"""One run on several ranks (torch.distributed, launched by torchrun): what ``greencore.train`` needs to run
the same plan on every rank and end with one process's result.

- Every rank runs the same plan (the same global batches, the same seed). Rank 0 chooses the epoch's tensors
  (the importance passes run there only) and broadcasts the choice, with the first step's gradients when the
  importance pass computed them; every rank then sets ``requires_grad`` from it and wraps the model in a new
  DistributedDataParallel, which registers exactly the tensors that train (DDP registers them when it is
  built: a tensor frozen after wrapping makes the next step fail, one unfrozen after it is never
  synchronised). The old wrapper is dropped, and its hooks with it.
- Each global batch is collated whole, as one process collates it, and cut into one contiguous slice of rows
  per rank (:meth:`Ranks.shard`): the slices keep the batch's padded length, so their FLOPs add up to the
  batch's, and each slice's loss is weighted by its share of the batch's loss terms (target tokens; rows for
  classification) times the world size, so that DDP's mean of the ranks' gradients is the gradient of the
  batch's mean loss: one process's update.
- Decisions are collective: a stop asked on any rank stops every rank before the same step; a loss that is
  not finite is seen by all (its sum is all-reduced before the check). Rank 0 writes the checkpoints; the
  others wait for it.
- The bytes DDP all-reduces are counted by a communication hook (:func:`counting_allreduce`); the
  broadcasts of a choice's first-step gradients are counted too.

Dropout draws its masks per rank, so a model with dropout trains like one process in distribution, not bit
for bit; without dropout the ranks' result equals one process's within float rounding.
"""

from __future__ import annotations

import datetime
import inspect
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

Batch = dict[str, torch.Tensor]
TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("GT_DIST_TIMEOUT_S", "600")))


@dataclass
class Ranks:
    """This process's place in a run of ``world`` ranks (torch.distributed initialised)."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    communicated: int = field(default=0)  # bytes all-reduced and broadcast since the last take_bytes()
    sharded: bool = False  # FSDP2 (greencore.sharded): every forward is a collective that all ranks run

    @classmethod
    def from_env(cls, device: str | None) -> Ranks | None:
        """The ranks torchrun describes in the environment (WORLD_SIZE > 1), the process group initialised
        (gloo on CPU, NCCL on CUDA); None for a run of one process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        local = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
        where = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(where)
        return cls(dist.get_rank(), dist.get_world_size(), local, where)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        box = [value if self.leader else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's values of ``tensors`` (the same shapes on every rank) into them, in place; counted."""
        for t in tensors:
            dist.broadcast(t, src=0)
            self.communicated += t.numel() * t.element_size()

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any."""
        t = torch.tensor([1 if flag else 0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def sum(self, values: list[float]) -> list[float]:
        """The sum over ranks of each value (float64)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``t`` (a copy)."""
        out = t.detach().clone()
        dist.all_reduce(out)
        return out

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        dist.barrier()

    def rows(self, n: int) -> range:
        """This rank's contiguous slice of ``n`` rows (the first ranks take one more when n does not
        divide)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (1 if self.rank < extra else 0))

    def shard(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's rows of ``batch`` (views: :meth:`rows` of its first dimension; empty when the batch
        has fewer rows than the ranks)."""
        rows = self.rows(batch["input_ids"].shape[0])
        return {k: v[rows.start : rows.stop] for k, v in batch.items()}

    def take_bytes(self) -> int:
        """The bytes counted since the last call."""
        taken, self.communicated = self.communicated, 0
        return taken


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``t`` when it is a DTensor (FSDP2's parameters and gradients), else ``t``."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def wrap(model: nn.Module, ranks: Ranks) -> nn.Module:
    """``model`` in a new DistributedDataParallel over the parameters that require a gradient now, its
    all-reduces counted into ``ranks.communicated``. No initial broadcast (every rank holds the same weights
    by construction) and no buffer broadcast (buffers are the same on every rank)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [ranks.device.index] if ranks.device.type == "cuda" else None
    # Buffers are not synchronised in forward (newer torch names the setting forward_sync_buffers).
    no_buffer_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
        else {"broadcast_buffers": False}
    )
    ddp = DistributedDataParallel(
        model, device_ids=ids, init_sync=False, find_unused_parameters=False, **no_buffer_sync
    )
    ddp.register_comm_hook(ranks, counting_allreduce)
    return ddp


def counting_allreduce(ranks, bucket):  # unannotated: DDP checks the annotation of bucket, a string here
    """DDP's default communication (the mean of the bucket over ranks), counting the bucket's bytes."""
    buffer = bucket.buffer()
    ranks.communicated += buffer.numel() * buffer.element_size()
    buffer.div_(ranks.world)
    # The reduction is in place: the future's value is ``buffer`` itself (returned as such, so that a fake
    # process group, whose futures hold no value, replays it: greencore.memory).
    return dist.all_reduce(buffer, async_op=True).get_future().then(lambda _: buffer)
