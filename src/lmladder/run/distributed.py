"""Multi-process runs (``torchrun`` / ``accelerate launch``, DDP): the launcher's ranks,
the process group, and the two ways ranks agree: a barrier, and rank 0's decision
broadcast to every rank. Every process runs the same ladder; global rank 0 alone decides,
writes and evaluates (docs/distributed.md)."""

from __future__ import annotations

import os

from lmladder.errors import LadderError


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment (torchrun, accelerate)."""
    return (
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )

def is_distributed() -> bool:
    return dist_env()[1] > 1

def is_main() -> bool:
    """Only global rank 0 writes files (adapter, predictions, results, report)."""
    return dist_env()[0] == 0

def init_distributed() -> bool:
    """Initialise the process group early (before the model loads) when launched with
    WORLD_SIZE > 1: gloo on CPU, NCCL on CUDA (and pin this process to its local GPU
    so the model loads there). Trainer / accelerate reuse the group. The timeout covers
    ranks waiting while rank 0 evaluates: ``LMLADDER_DIST_TIMEOUT`` seconds (default 4 h).
    Returns True when running distributed."""
    if not is_distributed():
        return False
    import datetime

    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return True
    _, _, local_rank = dist_env()
    cuda = torch.cuda.is_available() and not os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    if cuda:
        torch.cuda.set_device(local_rank)
    timeout = datetime.timedelta(seconds=float(os.environ.get("LMLADDER_DIST_TIMEOUT", 4 * 3600)))
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timeout)
    return True

def shutdown_distributed() -> None:
    """Final barrier, then tear the process group down. A rank that exits with the group
    still alive can abort in gloo's threads at interpreter exit (seen on a resume where
    no rung trained), so every distributed run ends here."""
    if not is_distributed():
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

def barrier() -> None:
    if is_distributed():
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()

def broadcast(obj):
    """``obj`` from rank 0 to every rank (picklable); identity when not distributed."""
    if not is_distributed():
        return obj
    import torch.distributed as dist

    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]

def sharding_requested() -> list[str]:
    """FSDP / DeepSpeed asked for by the launcher (accelerate's env); not supported yet."""
    return [
        name for name, env in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
        if os.environ.get(env, "").lower() in ("1", "true")
    ]

SHARDING_ERROR = (
    "lora: {what} sharding is not supported yet; launch with plain DDP (torchrun, or "
    "accelerate launch without an FSDP/DeepSpeed config), see docs/distributed.md"
)

def split_global_batch(batch_size: int, grad_accum: int, world_size: int) -> tuple[int, int]:
    """(per-device micro-batch, accumulation steps) so that micro x accum x world equals
    the configured global batch ``batch_size x grad_accum``; the micro-batch is the
    largest divisor not above ``batch_size`` (memory stays within the config's)."""
    G = batch_size * grad_accum
    if G % world_size:
        raise LadderError(
            f"lora.batch_size x lora.grad_accum = {batch_size} x {grad_accum} = {G} (the global "
            f"batch) is not divisible by the {world_size} processes (WORLD_SIZE); choose a "
            f"global batch that is a multiple of the number of processes"
        )
    per_rank = G // world_size
    micro = max(d for d in range(1, min(batch_size, per_rank) + 1) if per_rank % d == 0)
    return micro, per_rank // micro
