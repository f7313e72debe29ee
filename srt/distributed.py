"""DDP plumbing: the process group from torchrun's environment and the few collectives the
trainer and evaluation use. Everything works unchanged in a single process (world size 1)."""
from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device). torchrun sets the environment; NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get('WORLD_SIZE', 1))
    cuda = torch.cuda.is_available()
    if world > 1:
        local = int(os.environ['LOCAL_RANK'])
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group('nccl' if cuda else 'gloo')
        rank = dist.get_rank()
        device = torch.device(f'cuda:{local}' if cuda else 'cpu')
    else:
        rank, device = 0, torch.device('cuda' if cuda else 'cpu')
    return rank, world, device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shutdown(barrier: bool) -> None:
    """Leave the process group (after all ranks arrive, with ``barrier``); no-op without one."""
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def broadcast_flag(value: bool, device: torch.device) -> bool:
    """Rank 0's ``value`` on every rank (so that all ranks take the same branch)."""
    flag = torch.tensor(float(value), device=device)
    if is_distributed():
        dist.broadcast(flag, 0)
    return bool(flag)


def mean_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` averaged over ranks (in place under DDP)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.AVG)
    return tensor


def min_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s elementwise minimum over ranks (in place under DDP)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def gather_lists(items: list[Any]) -> list[Any]:
    """The concatenation of every rank's ``items`` (picklable), in rank order."""
    if not is_distributed():
        return items
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


def write_ddp_debug(model: nn.Module, seen_keys: list[str], out_dir: str, rank: int) -> None:
    """``ddp_debug.json`` (rank 0): per rank, parameter checksums and the scenes it trained on."""
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    info = {'rank': rank, 'param_sum': float(flat.sum()), 'param_abs_sum': float(flat.abs().sum()),
            'scenes': sorted(set(seen_keys))}
    gathered = gather_lists([info])
    if rank == 0:
        with open(os.path.join(out_dir, 'ddp_debug.json'), 'w') as f:
            json.dump(gathered, f)
