"""Evaluation: PSNR as the reference defines it (per item from its MSE, then averaged) and SSIM
(on full images, i.e. with full_scale). Used by the trainer's validation and by
``python -m srt.evaluate``; results are gathered over DDP ranks."""
from __future__ import annotations

import contextlib
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist

from srt.data import to_model_inputs
from srt.metrics import mse2psnr, ssim
from srt.renderer import render_rays


@torch.no_grad()
def evaluate(model, batches: Iterable[dict[str, Any]], device, render_kwargs: dict[str, Any],
             autocast=contextlib.nullcontext, full_scale: bool = False, chunk: int = 16384,
             progress=None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Returns (summary, per-item records) over all ranks. ``model`` is the unwrapped SRT."""
    was_training = model.training
    model.eval()
    records = []
    kwargs = {**render_kwargs, 'deterministic': True}  # reproducible volumetric sampling
    for batch in batches:
        x = to_model_inputs(batch, device)
        with autocast():
            z = model.encoder(x['input_images'], x['input_camera_pos'], x['input_rays'])
            pred, extras = render_rays(model, z, x['target_camera_pos'], x['target_rays'],
                                       chunk=chunk, **kwargs)
        pred = pred.float()  # unclamped, as the reference scores the isrt decoder's raw output
        target = x['target_pixels']
        mse = ((pred - target) ** 2).mean(dim=(1, 2))
        item = {'mse': mse, 'psnr': mse2psnr(mse)}
        if 'coarse_img' in extras:
            item['coarse_mse'] = ((extras['coarse_img'].float() - target) ** 2).mean(dim=(1, 2))
        if full_scale:
            h, w = (int(v) for v in batch['target_hw'][0])
            b = pred.shape[0]
            t = pred.shape[1] // (h * w)
            s = ssim(pred.clamp(0, 1).reshape(b * t, h, w, 3), target.reshape(b * t, h, w, 3))
            item['ssim'] = s.reshape(b, t).mean(dim=1)
        values = {k: v.cpu().numpy() for k, v in item.items()}
        for i in range(len(batch['scene_key'])):
            records.append({'scene_key': batch['scene_key'][i],
                            'scene_index': int(batch['scene_index'][i]),
                            'item': int(batch['item'][i]),
                            **{k: float(v[i]) for k, v in values.items()}})
        if progress is not None:
            progress.update(len(batch['scene_key']))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, records)
        records = [r for part in gathered for r in part]
    records.sort(key=lambda r: (r['scene_index'], r['item']))
    model.train(was_training)
    return summarize(records), records


def summarize(records: list[dict[str, Any]]) -> dict[str, float]:
    if not records:
        raise ValueError('evaluation saw no scenes')
    out = {'scenes': len({r['scene_key'] for r in records}), 'items': len(records)}
    for key in ('psnr', 'mse', 'ssim', 'coarse_mse'):
        if key in records[0]:
            out[key] = float(np.mean([r[key] for r in records]))
    return out
