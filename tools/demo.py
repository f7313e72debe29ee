#!/usr/bin/env python
"""The end-to-end demo on a CPU, from nothing to a trained SRT and an orbit video.

1. render a CLEVR-like set in the SRT MultiShapeNet TFRecord format (tools/make_synthetic.py,
   format msn-demo: 64x64 views, plain scenes),
2. convert it to shards with tools/convert_msn.py,
3. train with ``python -m srt.train`` (runs/demo/config.yaml) for a few minutes,
4. evaluate on held-out scenes (full images: PSNR, SSIM) beside two baselines on the same views: the
   model at iteration 0 and the best input-blind prediction (the mean training image),
5. render an orbit video of a held-out scene, and print where everything is.

Rerunning reuses what exists (data, shards, the run, which resumes until its iteration limit).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault('CUDA_VISIBLE_DEVICES', os.environ.get('CUDA_VISIBLE_DEVICES', ''))


def step(title: str) -> None:
    print(f'\n== {title}', flush=True)


def run(cmd: list[str]) -> None:
    print('$ ' + ' '.join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def mean_training_image(shards: str) -> 'np.ndarray':
    """Per-pixel mean of every view of every training scene, [h, w, 3] in [0, 1]."""
    import numpy as np
    from tqdm import tqdm

    from pipeline.reader import shard_urls
    from pipeline.verify import iter_samples
    from srt.data import SceneSource
    total, count = None, 0
    urls = shard_urls(shards, 'train')
    for url in tqdm(urls, desc='mean training image', unit='shard'):
        for sample in iter_samples(url):
            scene = SceneSource(sample)
            for v in range(scene.num_views):
                img = scene.image(v).astype(np.float64)
                total = img if total is None else total + img
                count += 1
    return (total / count / 255.0).astype(np.float32)


def evaluate_baselines(shards: str, config: str, run_dir: str, max_eval: int, seed: int) -> dict:
    """PSNR/SSIM of the trained model, the model at iteration 0 and the mean training image, on the
    same held-out items (full images)."""
    import dataclasses

    import numpy as np
    import torch

    from srt import config as run_config
    from srt.checkpoint import load_checkpoint, load_model_state
    from srt.evaluate import evaluate, summarize
    from srt.loader import EvalStream, loader, shard_table
    from srt.metrics import mse2psnr, ssim
    from srt.model.init import make_model

    cfg = run_config.build(run_config.load_yaml(config))
    data = dataclasses.replace(cfg.data, full_scale=True)
    stream = EvalStream(data, shard_table(shards, 'test'), 4, max_scenes=max_eval, seed=seed)
    model = make_model(cfg.model, seed, cfg.training.init)  # the trainer's iteration 0
    initial, _ = evaluate(model, loader(stream, 1), 'cpu', {}, full_scale=True)
    load_model_state(model, load_checkpoint(os.path.join(run_dir, 'model.pt')))
    trained, _ = evaluate(model, loader(stream, 1), 'cpu', {}, full_scale=True)
    mean = torch.from_numpy(mean_training_image(shards))
    records = []
    for batch in loader(stream, 1):
        target = torch.from_numpy(np.asarray(batch['target_pixels'])).float() / 255
        uv = np.asarray(batch['target_uv']).astype(np.int64)
        pred = mean[uv[..., 1], uv[..., 0]]
        mse = ((pred - target) ** 2).mean(dim=(1, 2))
        h, w = (int(v) for v in batch['target_hw'][0])
        b, t = len(mse), target.shape[1] // (h * w)
        s = ssim(pred.reshape(b * t, h, w, 3), target.reshape(b * t, h, w, 3)).reshape(b, t).mean(1)
        records += [{'scene_key': k, 'psnr': float(p), 'mse': float(m), 'ssim': float(x)}
                    for k, p, m, x in zip(batch['scene_key'], mse2psnr(mse), mse, s)]
    return {'trained': trained, 'iteration_0': initial, 'mean_training_image': summarize(records)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('--out', default=os.path.join(ROOT, 'demo_out'), help='everything goes here')
    p.add_argument('--scenes', type=int, default=2000, help='scenes to render (90%% train)')
    p.add_argument('--config', default=os.path.join(ROOT, 'runs/demo/config.yaml'))
    p.add_argument('--train-minutes', type=float, default=12.0, help='training time budget')
    p.add_argument('--max-eval', type=int, default=50, help='held-out scenes to evaluate')
    p.add_argument('--frames', type=int, default=60, help='frames of the orbit video')
    args = p.parse_args(argv)
    t0 = time.time()
    py = sys.executable
    source, shards, run_dir = (os.path.join(args.out, d) for d in ('source', 'shards', 'run'))

    step(f'1/5 render {args.scenes} CLEVR-like scenes in the MSN TFRecord format -> {source}')
    from pipeline.card import SYNTHETIC_MARKER
    if os.path.exists(os.path.join(source, SYNTHETIC_MARKER)):
        print('exists, reused')
    else:
        run([py, 'tools/make_synthetic.py', '--format', 'msn-demo', '--out', source,
             '--scenes', str(args.scenes)])

    step(f'2/5 convert to WebDataset shards -> {shards}')
    run([py, 'tools/convert_msn.py', '--src', source, '--out', shards, '--scenes-per-shard', '100',
         '--workers', '2'])
    run([py, 'tools/inspect_shards.py', shards, '--contact-sheet',
         os.path.join(args.out, 'contact_sheet.png'), '--scenes', '6'])

    step(f'3/5 train SRT for up to {args.train_minutes:g} minutes -> {run_dir}')
    run([py, '-m', 'srt.train', '--shards', shards, '--config', args.config, '--out', run_dir,
         '--max-minutes', str(args.train_minutes)])

    step(f'4/5 evaluate on {args.max_eval} held-out scenes (full images) with two baselines')
    from srt import config as run_config
    seed = run_config.build(run_config.load_yaml(args.config)).training.seed
    results = evaluate_baselines(shards, args.config, run_dir, args.max_eval, seed)

    step('5/5 render an orbit video of a held-out scene')
    video_dir = os.path.join(args.out, 'video')
    run([py, '-m', 'srt.render', '--shards', shards, '--checkpoint',
         os.path.join(run_dir, 'model.pt'), '--split', 'test', '--scene', '0', '--motion', 'rotate',
         '--num-frames', str(args.frames), '--out', video_dir])
    import av
    with av.open(os.path.join(video_dir, 'video.mp4')) as container:
        frames = sum(1 for _ in container.decode(video=0))

    import torch
    it = torch.load(os.path.join(run_dir, 'model.pt'), weights_only=True)['it']
    summary = {'iterations': it, 'minutes': (time.time() - t0) / 60, **results,
               'video_frames_decoded': frames}
    with open(os.path.join(args.out, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    print('\n== summary')
    print(f'source data    {source}')
    print(f'shards         {shards}  (dataset card: {shards}/README.md)')
    print(f'checkpoint     {run_dir}/model.pt  ({it} iterations)')
    print(f'metrics        {run_dir}/metrics.jsonl')
    print(f'pictures       {run_dir}/renders-val.png, {run_dir}/renders-train.png, '
          f'{args.out}/contact_sheet.png')
    print(f'video          {video_dir}/video.mp4 ({frames} frames decoded back)')
    print(f'\nheld-out test scenes: {results["trained"]["scenes"]} ({results["trained"]["items"]} '
          'items, full 64x64 target views)')
    print(f'{"":28}{"PSNR (dB)":>10}{"SSIM":>8}')
    for name, key in (('SRT, trained', 'trained'), ('SRT, iteration 0', 'iteration_0'),
                      ('mean training image', 'mean_training_image')):
        print(f'{name:28}{results[key]["psnr"]:>10.2f}{results[key]["ssim"]:>8.3f}')
    print(f'\ndone in {summary["minutes"]:.1f} minutes; summary in {args.out}/summary.json')
    return 0


if __name__ == '__main__':
    sys.exit(main())
