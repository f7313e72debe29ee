"""Evaluation: PSNR as the reference defines it (per item from its MSE, then averaged), SSIM (on
full images, i.e. with full_scale), and for a segmenting decoder (OSRT) ARI and FG-ARI of its slot
weights against the items' instance masks over all target pixels of an item, as OSRT's trainer
scores them. Used by the trainer's validation and by ``python -m srt.evaluate``; results are
gathered over DDP ranks.

Where the shards store category images (MSN format), ``python -m srt.evaluate`` also reports the
PSNR over the object pixels, and for shards of a generated source the object-blind baseline (the
same views rendered by the generator without objects): per scene and averaged (srt/objects.py)."""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import json
import os
import sys
from typing import Any, Iterable

import numpy as np
import torch
from tqdm import tqdm

from pipeline.fetch import ShardFetcher
from pipeline.reader import ShardError
from srt import runtime
from srt.config import FetchConfig, add_fetch_flags
from srt.checkpoint import CheckpointError, load_for_evaluation
from srt.data import to_model_inputs
from srt.distributed import gather_lists, setup_distributed, shutdown
from srt.loader import EvalStream, loader, split_shards
from srt.metrics import mse2psnr, nanmean, scorable, segmentation_scores, ssim
from srt.model.rendering import render_rays
from srt.objects import (OBJECT_METRICS, generator_of, has_object_masks, object_blind_pixels,
                         object_scores)


@torch.no_grad()
def evaluate(model, batches: Iterable[dict[str, Any]], device, render_kwargs: dict[str, Any],
             autocast=contextlib.nullcontext, full_scale: bool = False, chunk: int = 16384,
             progress=None, object_blind=None, lpips=None
             ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Returns (summary, per-item records) over all ranks. ``model`` is the unwrapped SRT.
    ``lpips`` (full images only: ([n, h, w, 3], [n, h, w, 3]) in [0, 1] -> [n], e.g.
    ``lpips_metric``'s) adds an 'lpips' column.

    Batches with object masks (``DataConfig.object_masks``) also get the object metrics
    (``srt.objects.object_scores``); ``object_blind`` (batch -> [b, p, 3] pixels, e.g.
    ``partial(srt.objects.object_blind_pixels, fmt, seed)``) adds the object-blind baseline's."""
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
        if 'segmentation' in extras and 'target_masks' in x and \
                scorable(x['target_masks'], extras['segmentation']):
            item.update(segmentation_scores(x['target_masks'], extras['segmentation'].float()))
        hw = tuple(int(v) for v in batch['target_hw'][0]) if full_scale else None
        if hw is not None:
            h, w = hw
            b = pred.shape[0]
            t = pred.shape[1] // (h * w)
            s = ssim(pred.clamp(0, 1).reshape(b * t, h, w, 3), target.reshape(b * t, h, w, 3))
            item['ssim'] = s.reshape(b, t).mean(dim=1)
            if lpips is not None:
                item['lpips'] = lpips(pred.clamp(0, 1).reshape(b * t, h, w, 3),
                                      target.reshape(b * t, h, w, 3)).reshape(b, t).mean(dim=1)
        if 'target_objects' in batch:
            item.update(object_scores(pred, target, batch, object_blind, hw))
        values = {k: v.cpu().numpy() for k, v in item.items()}
        for i in range(len(batch['scene_key'])):
            records.append({'scene_key': batch['scene_key'][i],
                            'scene_index': int(batch['scene_index'][i]),
                            'item': int(batch['item'][i]),
                            **{k: float(v[i]) for k, v in values.items()}})
        if progress is not None:
            progress.update(len(batch['scene_key']))
    records = gather_lists(records)
    records.sort(key=lambda r: (r['scene_index'], r['item']))
    model.train(was_training)
    return summarize(records), records


# Per-item metrics, in report order (ari / fg_ari: OSRT's slot weights against the instance masks).
METRICS = ('psnr', 'mse', 'ssim', 'lpips', 'coarse_mse', 'ari', 'fg_ari')


def summarize(records: list[dict[str, Any]]) -> dict[str, float]:
    if not records:
        raise ValueError('evaluation saw no scenes')
    out = {'scenes': len({r['scene_key'] for r in records}), 'items': len(records)}
    for key in METRICS:
        if key in records[0]:
            out[key] = float(np.mean([r[key] for r in records]))
    for key in OBJECT_METRICS:  # NaN for items without object pixels: skipped
        if key in records[0]:
            out[key] = nanmean(r[key] for r in records)
    return out


# ----------------------------------------------------------------------------- command line

def lpips_metric(device):
    """LPIPS (AlexNet) if the lpips package and its backbone weights are on this machine; no
    download ever happens at run time. Returns (fn or None, reason)."""
    try:
        import lpips  # noqa: F401
    except ImportError:
        return None, 'LPIPS skipped: the lpips package is not installed'
    hub = os.path.join(torch.hub.get_dir(), 'checkpoints')
    if not (os.path.isdir(hub) and any(f.startswith('alexnet') for f in os.listdir(hub))):
        return None, f'LPIPS skipped: no AlexNet weights in {hub} (no download at run time)'
    import lpips
    net = lpips.LPIPS(net='alex', verbose=False).to(device).eval()
    return (lambda a, b: net(a.permute(0, 3, 1, 2) * 2 - 1, b.permute(0, 3, 1, 2) * 2 - 1)
            .flatten()), 'LPIPS (AlexNet)'


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description='Evaluate an SRT checkpoint (ours or the reference\'s) '
                                'on a split of shards: PSNR (reference definition), SSIM, LPIPS; '
                                'for OSRT also ARI and FG-ARI against the instance masks.')
    p.add_argument('--shards', required=True, help='shard directory')
    p.add_argument('--checkpoint', required=True, help='model.pt / model_best.pt / reference file')
    p.add_argument('--config', help='YAML config (default: the checkpoint\'s, or the reference one)')
    p.add_argument('--split', default='test', help='split to evaluate (default test)')
    p.add_argument('--sampled', action='store_true', help='score num_points sampled rays per item '
                   'as the trainer\'s validation does, instead of full images')
    p.add_argument('--num-points', type=int, help='rays per item with --sampled')
    p.add_argument('--max-eval', type=int, help='only the first N scenes')
    p.add_argument('--seed', type=int, help='seed of the view/pixel draws (default: the run\'s)')
    p.add_argument('--batch-size', type=int, default=4, help='items per batch per rank')
    p.add_argument('--workers', type=int, default=1)
    p.add_argument('--precision', choices=('fp32', 'bf16'), default='fp32')
    p.add_argument('--skip-bad', action='store_true', help='skip unreadable shards (counted)')
    p.add_argument('--shard-url', help="read the shards from this URL template, e.g. "
                   "'https://host/msn/{name}' (--shards then only needs the manifests; remote "
                   "shards are checked against the manifest's sha256)")
    add_fetch_flags(p)
    p.add_argument('--out', help='directory for <split>_scenes.csv and <split>_summary.json '
                   '(default: the checkpoint\'s directory)')
    return p.parse_args(argv)


def write_report(out: str, split: str, summary: dict[str, Any], records: list[dict[str, Any]]
                 ) -> str:
    """``<split>_scenes.csv`` (per scene, its items' mean of each metric) and
    ``<split>_summary.json`` in ``out``; returns the CSV's path."""
    os.makedirs(out, exist_ok=True)
    per_scene: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in records:
        per_scene.setdefault((r['scene_index'], r['scene_key']), []).append(r)
    csv_path = os.path.join(out, f'{split}_scenes.csv')
    metrics = [k for k in (*METRICS, *OBJECT_METRICS) if k in records[0]]
    with open(csv_path, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['scene_index', 'scene_key', 'items', *metrics])
        for (index, key), rs in sorted(per_scene.items()):
            w.writerow([index, key, len(rs), *(f'{nanmean(r[m] for r in rs):.6f}'
                                               for m in metrics)])
    with open(os.path.join(out, f'{split}_summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    return csv_path


def object_note(summary: dict[str, Any], objects: bool, blind: bool) -> str:
    """The object metrics' line of ``python -m srt.evaluate`` (what was measured, or why not)."""
    if not objects:
        return 'object-pixel PSNR: not measured (the shards store no category images)'
    line = f'object-pixel PSNR {summary["object_psnr"]:.3f} dB'
    if not blind:
        return line + ('; object-blind baseline: not measured (not shards of a generated MSN-format '
                       'source on this machine)')
    return (line + f'; object-blind render: PSNR {summary["blind_psnr"]:.3f} dB, object-pixel '
            f'PSNR {summary["blind_object_psnr"]:.3f} dB (model - blind on object pixels: '
            f'{summary["object_psnr"] - summary["blind_object_psnr"]:+.2f} dB)')


def run(args: argparse.Namespace) -> None:
    rank, world, device = setup_distributed()
    model, cfg, ckpt = load_for_evaluation(args.checkpoint, args.shards, args.config, device)
    full = not args.sampled
    objects = has_object_masks(args.shards, args.split)  # category images: object-pixel PSNR
    generator = generator_of(args.shards, args.split) if objects else None
    blind = (functools.partial(object_blind_pixels, generator['format'], int(generator['seed']))
             if generator else None)
    data = dataclasses.replace(cfg.data, full_scale=full, object_masks=objects,
                               num_points=args.num_points or cfg.data.num_points)
    seed = args.seed if args.seed is not None else cfg.training.seed
    fetcher = ShardFetcher(FetchConfig.from_args(args).options())
    stream = EvalStream(data, split_shards(args.shards, args.split, args.shard_url),
                        args.batch_size, rank=rank, world_size=world, max_scenes=args.max_eval,
                        seed=seed, skip_bad=args.skip_bad, fetcher=fetcher)
    lpips_fn, lpips_note = lpips_metric(device) if full else (None, 'LPIPS needs full images')
    bar = tqdm(desc=f'evaluate {args.split}', unit='item', disable=rank != 0)
    summary, records = evaluate(model, loader(stream, args.workers), device,
                                runtime.render_kwargs(cfg, args.shards, args.shard_url),
                                runtime.autocast(device, args.precision), full_scale=full,
                                progress=bar, object_blind=blind, lpips=lpips_fn)
    bar.close()
    if rank == 0:
        summary.update(checkpoint=os.path.abspath(args.checkpoint), split=args.split,
                       full_images=full, iteration=ckpt.get('it'), lpips_note=lpips_note,
                       seed=seed)
        csv_path = write_report(args.out or os.path.dirname(os.path.abspath(args.checkpoint)),
                                args.split, summary, records)
        scores = ''.join(f', {name} {summary[key]:.4f}' for key, name in (
            ('ssim', 'SSIM'), ('lpips', 'LPIPS'), ('ari', 'ARI'), ('fg_ari', 'FG-ARI')) if key in summary)
        print(f'{args.split}: {summary["scenes"]} scenes, {summary["items"]} items: PSNR '
              f'{summary["psnr"]:.3f} dB{scores}\n{lpips_note}\nper-scene CSV: {csv_path}')
        print(object_note(summary, objects, generator is not None))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (CheckpointError, ShardError, FileNotFoundError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    finally:
        shutdown(barrier=False)
    return 0


if __name__ == '__main__':
    sys.exit(main())
