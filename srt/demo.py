"""The end-to-end demo on a CPU, from nothing to a trained SRT and an orbit video.

1. render a CLEVR-like set in the SRT MultiShapeNet TFRecord format (``make-synthetic``, format
   msn-demo: 64x64 views, plain scenes),
2. convert it to shards (``convert msn``) and draw a contact sheet (``inspect``),
3. train with ``python -m srt.train`` (``srt/demo.yaml``) for a few minutes,
4. evaluate on held-out scenes (full images: PSNR, SSIM) beside two baselines on the same views: the
   model at iteration 0 and the best input-blind prediction (the mean training image),
5. render an orbit video of a held-out scene, and print where everything is.

``srt-shards demo`` and ``python tools/demo.py`` (``make demo``) run it. Each step runs as its own
process, the data tools through ``python -m srt.cli``. Rerunning reuses what exists (data, shards,
the run, which resumes until its iteration limit).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Sequence

# The demo's run config, shipped inside the package (setup.cfg package_data).
DEMO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'demo.yaml')
# The directory that holds the srt and pipeline packages; a source checkout when setup.cfg is there.
_PACKAGES_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def step(title: str) -> None:
    print(f'\n== {title}', flush=True)


def _child_env() -> dict[str, str]:
    """The demo's steps import the same packages as the demo: from a source checkout (not
    installed), put it on the children's path; an installed package is found anyway."""
    env = dict(os.environ)
    if os.path.exists(os.path.join(_PACKAGES_DIR, 'setup.cfg')):
        env['PYTHONPATH'] = os.pathsep.join(p for p in (_PACKAGES_DIR, env.get('PYTHONPATH')) if p)
    return env


def run(cmd: list[str]) -> None:
    print('$ ' + ' '.join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=_child_env())


def mean_training_image(shards: str) -> 'np.ndarray':
    """Per-pixel mean of every view of every training scene, [h, w, 3] in [0, 1]."""
    import numpy as np
    from tqdm import tqdm

    from pipeline.reader import Scene, iter_shard, shard_urls
    total, count = None, 0
    urls = shard_urls(shards, 'train')
    for url in tqdm(urls, desc='mean training image', unit='shard'):
        for sample in iter_shard(url):
            scene = Scene(sample)
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


def main(argv: Sequence[str] | None = None, prog: str = 'srt-shards demo',
         out: str = 'demo_out') -> int:
    """The demo's command line; ``out`` is the default of ``--out``."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('--out', default=out, help=f'everything goes here (default {out})')
    p.add_argument('--scenes', type=int, default=2000, help='scenes to render (90%% train)')
    p.add_argument('--config', default=DEMO_CONFIG, help='run config (default: srt/demo.yaml)')
    p.add_argument('--train-minutes', type=float, default=12.0, help='training time budget')
    p.add_argument('--max-eval', type=int, default=50, help='held-out scenes to evaluate')
    p.add_argument('--frames', type=int, default=60, help='frames of the orbit video')
    args = p.parse_args(argv)
    os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')  # the CPU demo, also on a machine with GPUs
    try:
        return run_demo(args)
    except subprocess.CalledProcessError as e:
        print(f'error: a demo step failed (exit {e.returncode}): {" ".join(e.cmd)}',
              file=sys.stderr)
        return 1


def run_demo(args: argparse.Namespace) -> int:
    """The five steps (``args``: the command line's)."""
    t0 = time.time()
    py = sys.executable
    args.out, args.config = os.path.abspath(args.out), os.path.abspath(args.config)
    source, shards, run_dir = (os.path.join(args.out, d) for d in ('source', 'shards', 'run'))

    step(f'1/5 render {args.scenes} CLEVR-like scenes in the MSN TFRecord format -> {source}')
    from pipeline.synthetic import SYNTHETIC_MARKER
    if os.path.exists(os.path.join(source, SYNTHETIC_MARKER)):
        print('exists, reused')
    else:
        run([py, '-m', 'srt.cli', 'make-synthetic', '--format', 'msn-demo', '--out', source,
             '--scenes', str(args.scenes)])

    step(f'2/5 convert to WebDataset shards -> {shards}')
    run([py, '-m', 'srt.cli', 'convert', 'msn', '--src', source, '--out', shards,
         '--scenes-per-shard', '100', '--workers', '2'])
    run([py, '-m', 'srt.cli', 'inspect', shards, '--contact-sheet',
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
