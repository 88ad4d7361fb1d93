"""Share a streaming compress among processes with torch.distributed: every process clusters some of
the layer groups on its own device, and process 0 writes the whole result.

Launch the ordinary command under `torchrun` or `accelerate launch`; nothing else changes:

    torchrun --nproc-per-node 4 -m hf_mlpfusion.cli.main compress meta-llama/Llama-2-7b-hf -o out
    accelerate launch --num_processes 4 -m hf_mlpfusion.cli.main compress ... -o out

Both set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, which `Workers.from_env()`
reads. The layer groups are dealt out in rounds (group r * W + j to process j); after each round
the other processes send their fused tensors to process 0 (a few MB to a few hundred MB: one
group's result each), which writes them into the shards. Only CPU tensors and small objects travel,
over a gloo group, so the same code serves CPU-only machines and GPUs (each process clusters on
`cuda:LOCAL_RANK` with `--device auto` or `cuda`). The output is byte for byte the one-process
output: the groups, and the numbers in each, do not depend on how many processes share them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch


@dataclass
class Workers:
    """This process's place among the processes sharing a compress (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: object = None  # the gloo process group objects travel through (None: the default group)
    owns_group: bool = field(default=False, repr=False)  # whether we initialised torch.distributed

    @classmethod
    def from_env(cls) -> "Workers":
        """Join the processes `torchrun` / `accelerate launch` started (or an already initialised group)."""
        import torch.distributed as dist

        initialised = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if initialised else int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return cls()
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        owns = False
        if not initialised:
            dist.init_process_group(backend="gloo")
            owns = True
        group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return cls(dist.get_rank(), dist.get_world_size(), local, group, owns)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, device: str | torch.device | None) -> str:
        """The device this process clusters on: `--device auto`/`cuda` -> cuda:LOCAL_RANK when there are GPUs."""
        text = "auto" if device is None else str(device)
        if self.world_size > 1 and text in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return text

    def mine(self, items: list) -> list:
        """The items this process handles, round by round: items[r * W + rank]."""
        return items[self.rank :: self.world_size]

    def gather(self, obj):
        """Process 0 gets every process's `obj` (a list, by rank); the others get None."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size if self.main else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def broadcast(self, obj):
        """Process 0's `obj`, on every process."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owns_group = False


def is_main_process() -> bool:
    """Whether this process reports and publishes (rank 0 under torchrun/accelerate; always true alone)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0") or 0) == 0


__all__ = ["Workers", "is_main_process"]
