"""Visualisation grids: per scene, the input views, renders from 6 rotations of the first input
camera about the world's vertical axis, and depth for the volumetric decoder."""
from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import numpy as np
import torch

from pipeline.cameras import transform_points_torch
from srt.data import to_model_inputs
from srt.model.rendering import render_image


def rotate_z(x: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotate points or directions [..., 3] about the z axis by ``angle`` radians."""
    c, s = math.cos(angle), math.sin(angle)
    return torch.stack([c * x[..., 0] - s * x[..., 1], s * x[..., 0] + c * x[..., 1], x[..., 2]], -1)


@torch.no_grad()
def render_rotations(model, batch: dict[str, Any], device, render_kwargs: dict[str, Any],
                     num_angles: int = 6, autocast=contextlib.nullcontext, chunk: int = 16384
                     ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """(inputs [b, k, h, w, 3], renders per angle [b, h, w, 3], depths per angle [b, h, w] or [])."""
    was_training = model.training
    model.eval()
    x = to_model_inputs(batch, device)
    with autocast():
        z = model.encoder(x['input_images'], x['input_camera_pos'], x['input_rays'])
    pos, rays = x['input_camera_pos'][:, 0], x['input_rays'][:, 0]  # [b, 3], [b, h, w, 3]
    b, h, w, _ = rays.shape
    transform = x.get('transform')
    if transform is not None:  # rotate in the world frame, where z is up
        inv = torch.linalg.inv(transform)
        pos = transform_points_torch(pos[:, None], inv)[:, 0]
        rays = transform_points_torch(rays.reshape(b, -1, 3), inv, translate=False).reshape(b, h, w, 3)
    renders, depths = [], []
    kwargs = {**render_kwargs, 'deterministic': True}
    for i in range(num_angles):
        angle = 2 * math.pi * i / num_angles
        p, r = rotate_z(pos, angle), rotate_z(rays, angle)
        if transform is not None:
            p = transform_points_torch(p[:, None], transform)[:, 0]
            r = transform_points_torch(r.reshape(b, -1, 3), transform, translate=False).reshape(b, h, w, 3)
        with autocast():
            img, extras = render_image(model, z, p, r, chunk=chunk, **kwargs)
        renders.append(img.float().clamp(0, 1).cpu().numpy())
        if 'depth' in extras:
            depths.append(extras['depth'].float().cpu().numpy())
    model.train(was_training)
    inputs = x['input_images'].permute(0, 1, 3, 4, 2).cpu().numpy()
    return inputs, renders, depths


def save_grid(path: str, inputs: np.ndarray, renders: list[np.ndarray], depths: list[np.ndarray],
              far: float | None = None, labels: list[str] | None = None) -> str:
    """A PNG: one row per scene; columns inputs | renders | depths, with a header of labels."""
    from PIL import Image, ImageDraw
    b, k, h, w, _ = inputs.shape
    cols = [inputs[:, i] for i in range(k)] + list(renders)
    names = [f'input {i + 1}' if k > 1 else 'input' for i in range(k)]
    names += [f'rot {360 * i // len(renders)}' for i in range(len(renders))]
    for i, d in enumerate(depths):
        scale = far if far else max(float(d.max()), 1e-6)
        cols.append(np.repeat(np.clip(d / scale, 0, 1)[..., None], 3, -1))
        names.append(f'depth {360 * i // len(depths)}')
    pad, header = 2, 14
    grid = np.ones((header + b * (h + pad), len(cols) * (w + pad), 3))
    for c, col in enumerate(cols):
        for r in range(b):
            grid[header + r * (h + pad):header + r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = col[r]
    img = Image.fromarray((grid * 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for c, name in enumerate(labels or names):
        draw.text((c * (w + pad) + 2, 1), name, fill=(0, 0, 0))
    img.save(path)
    return path


def write_rotation_grids(out_dir: str, model, batches: dict[str, dict[str, Any]], device,
                         render_kwargs: dict[str, Any], autocast=contextlib.nullcontext) -> None:
    """``renders-<name>.png`` in ``out_dir`` for each named batch (the trainer's visualisation)."""
    for name, batch in batches.items():
        inputs, renders, depths = render_rotations(model, batch, device, render_kwargs,
                                                   autocast=autocast)
        save_grid(os.path.join(out_dir, f'renders-{name}.png'), inputs, renders, depths,
                  far=render_kwargs.get('max_dist'))
