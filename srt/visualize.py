"""Visualisation grids: per scene, the input views, renders from 6 rotations of the first input
camera about the world's vertical axis, depth for the volumetric decoder, and for a segmenting
decoder (OSRT) the true segmentation of the first input view and the predicted one (argmax slot)
of each render, in OSRT's colours (:func:`clustering_colors`), each row labelled with the 2D FG-ARI
of the first render against the input view's mask, as OSRT's trainer draws them."""
from __future__ import annotations

import colorsys
import contextlib
import dataclasses
import math
import os
from typing import Any

import numpy as np
import torch

from pipeline.cameras import transform_points_torch
from srt.data import to_model_inputs
from srt.metrics import scorable, segmentation_scores
from srt.model.rendering import render_image


def clustering_colors(n: int) -> np.ndarray:
    """[n + 1, 3] RGB in [0, 1] of segment ids 0..n: black for 0, then HSV(i / n, 0.45, 0.8) for id
    i + 1 (stelzner/osrt ``osrt/utils/visualize.py`` get_clustering_colors)."""
    return np.array([(0.0, 0.0, 0.0)] + [colorsys.hsv_to_rgb(i / n, 0.45, 0.8) for i in range(n)])


def colorize(ids: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """Integer segment ids [...] -> RGB [..., 3] through ``colors`` (``clustering_colors``)."""
    return colors[ids]


@dataclasses.dataclass
class Rotations:
    """What :func:`render_rotations` renders for a batch of b scenes (h x w: the input views')."""
    inputs: np.ndarray  # [b, k, h, w, 3] input views in [0, 1]
    renders: list[np.ndarray]  # per angle [b, h, w, 3]
    depths: list[np.ndarray]  # per angle [b, h, w] (volumetric decoder; else empty)
    segmentations: list[np.ndarray]  # per angle [b, h, w] argmax slot (segmenting decoder; else empty)
    true_segmentation: np.ndarray | None = None  # [b, h, w] mask channel of input view 0
    fg_ari: np.ndarray | None = None  # [b] 2D FG-ARI of the first render against it


def rotate_z(x: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotate points or directions [..., 3] about the z axis by ``angle`` radians."""
    c, s = math.cos(angle), math.sin(angle)
    return torch.stack([c * x[..., 0] - s * x[..., 1], s * x[..., 0] + c * x[..., 1], x[..., 2]], -1)


@torch.no_grad()
def render_rotations(model, batch: dict[str, Any], device, render_kwargs: dict[str, Any],
                     num_angles: int = 6, autocast=contextlib.nullcontext, chunk: int = 16384
                     ) -> Rotations:
    """Encode the batch's input views and render ``num_angles`` rotations of the first input
    camera (see :class:`Rotations`)."""
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
    renders, depths, segs = [], [], []
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
        if 'segmentation' in extras:
            segs.append(extras['segmentation'].float().cpu())
    model.train(was_training)
    out = Rotations(x['input_images'].permute(0, 1, 3, 4, 2).cpu().numpy(), renders, depths,
                    [s.argmax(-1).numpy() for s in segs])
    if segs and 'input_mask_ids' in x:
        true = x['input_mask_ids'][:, 0].cpu()  # [b, h, w]: the first render's camera is view 0's
        out.true_segmentation = true.numpy()
        masks = torch.nn.functional.one_hot(true.flatten(1), int(batch['mask_channels'][0]))
        weights = segs[0].flatten(1, 2)
        if scorable(masks, weights):
            out.fg_ari = segmentation_scores(masks.float(), weights)['fg_ari'].numpy()
    return out


def save_grid(path: str, rot: Rotations, far: float | None = None,
              labels: list[str] | None = None) -> str:
    """A PNG: one row per scene; columns inputs | renders | depths | true segmentation | predicted
    segmentations, with a header of labels (and each row's FG-ARI at its left edge)."""
    from PIL import Image, ImageDraw
    b, k, h, w, _ = rot.inputs.shape
    cols = [rot.inputs[:, i] for i in range(k)] + list(rot.renders)
    names = [f'input {i + 1}' if k > 1 else 'input' for i in range(k)]
    names += [f'rot {360 * i // len(rot.renders)}' for i in range(len(rot.renders))]
    for i, d in enumerate(rot.depths):
        scale = far if far else max(float(d.max()), 1e-6)
        cols.append(np.repeat(np.clip(d / scale, 0, 1)[..., None], 3, -1))
        names.append(f'depth {360 * i // len(rot.depths)}')
    segs = ([rot.true_segmentation] if rot.true_segmentation is not None else []) + rot.segmentations
    if segs:  # one palette for the grid: as many colours as the largest id shown (OSRT's way)
        colors = clustering_colors(max(1, max(int(s.max()) for s in segs)))
        cols += [colorize(s, colors) for s in segs]
        names += ['true seg'] * (rot.true_segmentation is not None)
        names += [f'seg {360 * i // len(rot.segmentations)}' for i in range(len(rot.segmentations))]
    pad, header = 2, 14
    grid = np.ones((header + b * (h + pad), len(cols) * (w + pad), 3))
    for c, col in enumerate(cols):
        for r in range(b):
            grid[header + r * (h + pad):header + r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = col[r]
    img = Image.fromarray((grid * 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for c, name in enumerate(labels or names):
        draw.text((c * (w + pad) + 2, 1), name, fill=(0, 0, 0))
    for r, score in enumerate(rot.fg_ari if rot.fg_ari is not None else []):
        draw.text((2, header + r * (h + pad) + h - 12), f'FG-ARI {100 * score:.1f}',
                  fill=(255, 255, 255))
    img.save(path)
    return path


def write_rotation_grids(out_dir: str, model, batches: dict[str, dict[str, Any]], device,
                         render_kwargs: dict[str, Any], autocast=contextlib.nullcontext) -> None:
    """``renders-<name>.png`` in ``out_dir`` for each named batch (the trainer's visualisation)."""
    for name, batch in batches.items():
        rot = render_rotations(model, batch, device, render_kwargs, autocast=autocast)
        save_grid(os.path.join(out_dir, f'renders-{name}.png'), rot, far=render_kwargs.get('max_dist'))
