"""Chunked rendering: decode many rays (whole images) with bounded memory.

Axis vocabulary: b batch, r rays, h, w image rows/columns. Call under ``torch.no_grad()`` (or
``torch.inference_mode()``) for evaluation: with autograd on, every chunk's activations are kept.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from torch import Tensor, nn

Extras = Dict[str, Tensor]


def _decoder_of(model_or_decoder: nn.Module) -> nn.Module:
    return getattr(model_or_decoder, 'decoder', model_or_decoder)


def render_rays(model_or_decoder: nn.Module, z: Tensor, camera_pos: Tensor, rays: Tensor,
                chunk: int = 8192, **render_kwargs: Any) -> Tuple[Tensor, Extras]:
    """Decode rays ``chunk`` at a time per scene and concatenate.

    Args:
        model_or_decoder: an :class:`srt.model.core.SRT` (its ``decoder`` is used) or a decoder.
        z: [b, n, 768] scene latents.
        camera_pos: [b, r, 3] ray origins; rays: [b, r, 3] unit directions.
        chunk: rays per scene per decoder call.
        render_kwargs: passed to the decoder (min_dist, max_dist, num_coarse_samples, ...).
    Returns:
        pixels [b, r, 3] and extras, each [b, r, ...] (e.g. depth [b, r]).
    """
    if chunk < 1:
        raise ValueError(f'chunk must be >= 1, got {chunk}')
    decoder = _decoder_of(model_or_decoder)
    num_rays = rays.shape[1]
    pixels, extras = [], []
    for start in range(0, num_rays, chunk):
        stop = min(start + chunk, num_rays)
        p, e = decoder(z, camera_pos[:, start:stop], rays[:, start:stop], **render_kwargs)
        pixels.append(p)
        extras.append(e)
    if len(pixels) == 1:
        return pixels[0], extras[0]
    return torch.cat(pixels, dim=1), {k: torch.cat([e[k] for e in extras], dim=1) for k in extras[0]}


def render_image(model_or_decoder: nn.Module, z: Tensor, camera_pos: Tensor, rays: Tensor,
                 chunk: int = 8192, **render_kwargs: Any) -> Tuple[Tensor, Extras]:
    """Render one image per scene from one camera.

    Args:
        z: [b, n, 768] scene latents.
        camera_pos: [b, 3] camera position; rays: [b, h, w, 3] unit directions per pixel.
    Returns:
        image [b, h, w, 3] and extras reshaped to [b, h, w, ...] (e.g. depth [b, h, w]).
    """
    b, h, w, _ = rays.shape
    flat_rays = rays.reshape(b, h * w, 3)
    flat_pos = camera_pos[:, None, :].expand(b, h * w, 3)
    pixels, extras = render_rays(model_or_decoder, z, flat_pos, flat_rays, chunk=chunk, **render_kwargs)
    image = pixels.reshape(b, h, w, pixels.shape[-1])
    return image, {k: v.reshape(b, h, w, *v.shape[2:]) for k, v in extras.items()}
