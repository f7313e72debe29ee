"""Run-time settings shared by training, evaluation and videos: the volumetric decoder's render
settings, mixed precision, seeding. One definition each, so the three cannot drift apart."""
from __future__ import annotations

import contextlib
import random
from typing import Any, Callable, ContextManager

import numpy as np
import torch

from pipeline.reader import render_range
from srt.config import RunConfig

AutocastFactory = Callable[[], ContextManager]


def render_kwargs(cfg: RunConfig, shards_dir: str, url_template: str | None = None
                  ) -> dict[str, Any]:
    """The decoder's keyword arguments for a run on the shards in ``shards_dir`` (read from
    ``url_template`` when given, ``--shard-url``): for the volumetric decoder the dataset's
    near/far (world units, from the train split's manifest or metadata) and the config's sample
    counts; nothing for the others."""
    if cfg.model.decoder != 'nerf':
        return {}
    near, far = render_range(shards_dir, 'train', url_template)
    return {'min_dist': near, 'max_dist': far,
            'num_coarse_samples': cfg.training.num_coarse_samples,
            'num_fine_samples': cfg.training.num_fine_samples}


def use_bf16(precision: str, device: torch.device) -> bool:
    """``precision`` 'bf16', or 'auto' on a GPU that supports bf16; 'fp32' never."""
    if precision not in ('auto', 'bf16', 'fp32'):
        raise ValueError(f'precision must be auto, bf16 or fp32, got {precision!r}')
    if precision == 'auto':
        return device.type == 'cuda' and torch.cuda.is_bf16_supported()
    return precision == 'bf16'


def autocast(device: torch.device, precision: str) -> AutocastFactory:
    """A factory of the forward pass's autocast context (``with autocast_factory(): ...``): bf16
    autocast on ``device`` when :func:`use_bf16`, else a no-op context."""
    if use_bf16(precision, device):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def peak_memory(device: torch.device) -> dict[str, float]:
    """{'peak_mem_gb': peak GPU memory allocated} on CUDA, else {'peak_rss_gb': the process's peak
    resident memory} (GiB)."""
    if device.type == 'cuda':
        return {'peak_mem_gb': torch.cuda.max_memory_allocated(device) / 2**30}
    import resource
    return {'peak_rss_gb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def configure(device: torch.device, seed: int, deterministic: bool = False) -> None:
    """Seed torch, numpy and Python; deterministic algorithms on request; TF32 matmuls on CUDA."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
