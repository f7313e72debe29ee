"""The end-to-end demo on a CPU, from nothing to a trained SRT and an orbit video.

1. render a CLEVR-like set in the SRT MultiShapeNet TFRecord format (``make-synthetic``, format
   msn-demo: 32x32 views on a ring of cameras, 1-2 plain objects per scene),
2. convert it to shards (``convert msn``) and draw a contact sheet (``inspect``),
3. train with ``python -m srt.train`` (``srt/demo.yaml``) for a few minutes,
4. evaluate on held-out scenes (full images: PSNR, PSNR over the object pixels, SSIM) beside three
   baselines on the same views: the model at iteration 0, the best input-blind prediction (the mean
   training image) and the object-blind render (the generator's view with the objects removed: the
   best a model can do that does not see objects; srt/objects.py); write the held-out picture,
5. render an orbit video of a held-out scene, and print where everything is.

``srt-shards demo`` and ``python tools/demo.py`` (``make demo``) run it. Each step runs as its own
process, the data tools through ``python -m srt.cli``. Rerunning reuses what exists (data, shards,
the run, which resumes until its iteration limit). Every process runs one intra-op thread unless
``OMP_NUM_THREADS`` is set: the small demo model gains little from a second thread on an idle
2-core machine, and on a machine shared with other jobs two threads made its step 10x slower
(README "Results").
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


def evaluate_heldout(shards: str, config: str, run_dir: str, max_eval: int, seed: int,
                     out: str) -> dict:
    """PSNR, object-pixel PSNR and SSIM on the same held-out items (full target views) of the
    trained model and three baselines: the model at iteration 0, the mean training image (the best
    input-blind prediction) and the object-blind render (the generator's view without objects: the
    best any model can do that does not see the objects; ``srt.objects``). Writes
    ``heldout_scenes.csv`` / ``heldout_summary.json`` (per scene: the trained model and the
    object-blind render) and ``heldout.png`` (``save_heldout_grid``)."""
    import dataclasses
    import functools

    import numpy as np
    import torch

    from srt import config as run_config
    from srt.checkpoint import load_checkpoint, load_model_state
    from srt.data import to_model_inputs
    from srt.evaluate import evaluate, summarize, write_report
    from srt.loader import EvalStream, loader, shard_table
    from srt.model.init import make_model
    from srt.objects import generator_of, image_scores, object_blind_pixels

    cfg = run_config.build(run_config.load_yaml(config))
    generator = generator_of(shards, 'test')
    if generator is None:
        raise ValueError(f'{shards}: the object-blind baseline needs the generated MSN-format source '
                         'the shards were converted from (manifest source.path)')
    blind = functools.partial(object_blind_pixels, generator['format'], int(generator['seed']))
    data = dataclasses.replace(cfg.data, full_scale=True, object_masks=True)
    stream = EvalStream(data, shard_table(shards, 'test'), 4, max_scenes=max_eval, seed=seed)
    model = make_model(cfg.model, seed, cfg.training.init)  # the trainer's iteration 0
    initial, _ = evaluate(model, loader(stream, 1), 'cpu', {}, full_scale=True, object_blind=blind)
    load_model_state(model, load_checkpoint(os.path.join(run_dir, 'model.pt')))
    trained, records = evaluate(model, loader(stream, 1), 'cpu', {}, full_scale=True,
                                object_blind=blind)
    write_report(out, 'heldout', trained, records)
    mean = torch.from_numpy(mean_training_image(shards))
    mean_records = []
    for batch in loader(stream, 1):
        x = to_model_inputs(batch)
        uv = torch.as_tensor(np.asarray(batch['target_uv'])).long()
        mask = torch.as_tensor(np.asarray(batch['target_objects']))
        hw = tuple(int(v) for v in batch['target_hw'][0])
        scores = image_scores(mean[uv[..., 1], uv[..., 0]], x['target_pixels'], mask, hw)
        mean_records += [{'scene_key': k, **{m: float(v[i]) for m, v in scores.items()}}
                         for i, k in enumerate(batch['scene_key'])]
    object_blind = {'scenes': trained['scenes'], 'items': trained['items'],
                    'psnr': trained['blind_psnr'], 'object_psnr': trained['blind_object_psnr'],
                    'ssim': trained['blind_ssim']}
    save_heldout_grid(os.path.join(out, 'heldout.png'), model, next(iter(loader(stream, 0))), blind)
    return {'trained': trained, 'iteration_0': initial, 'mean_training_image':
            summarize(mean_records), 'object_blind': object_blind}


def save_heldout_grid(path: str, model, batch: dict, blind, views: int = 3, zoom: int = 3) -> None:
    """One row per item of ``batch`` (full-scale items of held-out scenes): its input views |
    ``views`` novel views predicted by ``model`` | the same views' ground truth | their
    object-blind render (``blind``: batch -> pixels), each image enlarged ``zoom`` times."""
    import numpy as np
    import torch

    from srt.data import to_model_inputs
    from srt.model.rendering import render_rays
    from srt.visualize import Rotations, save_grid

    x = to_model_inputs(batch)
    model.eval()
    with torch.no_grad():
        z = model.encoder(x['input_images'], x['input_camera_pos'], x['input_rays'])
        pred = render_rays(model, z, x['target_camera_pos'], x['target_rays'])[0].clamp(0, 1)
    h, w = (int(v) for v in batch['target_hw'][0])
    b, t = pred.shape[0], pred.shape[1] // (h * w)
    pick = [round(i * (t - 1) / max(views - 1, 1)) for i in range(views)]

    def big(a):  # [b, h', w', 3] -> [b, zoom * h, zoom * w, 3] (nearest neighbour)
        return np.repeat(np.repeat(a, zoom * h // a.shape[1], 1), zoom * w // a.shape[2], 2)

    inputs = np.asarray(batch['input_images']).astype(np.float32) / 255
    inputs = np.stack([big(inputs[:, k]) for k in range(inputs.shape[1])], 1)
    cols, labels = [], [f'input {k + 1}' for k in range(inputs.shape[1])]
    for label, flat in (('SRT', pred), ('truth', x['target_pixels']), ('no objects', blind(batch))):
        images = flat.numpy().reshape(b, t, h, w, 3)
        for j, v in enumerate(pick):
            cols.append(big(images[:, v]))
            labels.append(f'{label} {j + 1}')
    save_grid(path, Rotations(inputs, cols, [], []), labels=labels)


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
    os.environ.setdefault('OMP_NUM_THREADS', '1')  # this process's evaluation and every step
    try:
        return run_demo(args)
    except subprocess.CalledProcessError as e:
        print(f'error: a demo step failed (exit {e.returncode}): {" ".join(e.cmd)}',
              file=sys.stderr)
        return 1


def run_demo(args: argparse.Namespace) -> int:
    """The five steps (``args``: the command line's)."""
    import torch
    torch.set_num_threads(int(os.environ['OMP_NUM_THREADS']))  # torch may be loaded already
    t0 = time.time()
    stages: dict[str, float] = {}
    py = sys.executable
    args.out, args.config = os.path.abspath(args.out), os.path.abspath(args.config)
    source, shards, run_dir = (os.path.join(args.out, d) for d in ('source', 'shards', 'run'))

    def done(name: str, since: float) -> float:
        stages[name] = round(time.time() - since, 1)
        return time.time()

    step(f'1/5 render {args.scenes} CLEVR-like scenes in the MSN TFRecord format -> {source}')
    t = time.time()
    from pipeline.synthetic import SYNTHETIC_MARKER
    if os.path.exists(os.path.join(source, SYNTHETIC_MARKER)):
        print('exists, reused')
    else:
        run([py, '-m', 'srt.cli', 'make-synthetic', '--format', 'msn-demo', '--out', source,
             '--scenes', str(args.scenes)])
    t = done('render', t)

    step(f'2/5 convert to WebDataset shards -> {shards}')
    run([py, '-m', 'srt.cli', 'convert', 'msn', '--src', source, '--out', shards,
         '--scenes-per-shard', '100', '--workers', '2'])
    run([py, '-m', 'srt.cli', 'inspect', shards, '--contact-sheet',
         os.path.join(args.out, 'contact_sheet.png'), '--scenes', '6'])
    t = done('convert', t)

    step(f'3/5 train SRT for up to {args.train_minutes:g} minutes -> {run_dir}')
    run([py, '-m', 'srt.train', '--shards', shards, '--config', args.config, '--out', run_dir,
         '--max-minutes', str(args.train_minutes)])
    t = done('train', t)

    step(f'4/5 evaluate on {args.max_eval} held-out scenes (full images) against three baselines')
    from srt import config as run_config
    seed = run_config.build(run_config.load_yaml(args.config)).training.seed
    results = evaluate_heldout(shards, args.config, run_dir, args.max_eval, seed, args.out)
    t = done('evaluate', t)

    step('5/5 render an orbit video of a held-out scene')
    video_dir = os.path.join(args.out, 'video')
    run([py, '-m', 'srt.render', '--shards', shards, '--checkpoint',
         os.path.join(run_dir, 'model.pt'), '--split', 'test', '--scene', '0', '--motion', 'rotate',
         '--num-frames', str(args.frames), '--out', video_dir])
    import av
    with av.open(os.path.join(video_dir, 'video.mp4')) as container:
        frames = sum(1 for _ in container.decode(video=0))
    done('video', t)

    it = torch.load(os.path.join(run_dir, 'model.pt'), weights_only=True)['it']
    trained, blind = results['trained'], results['object_blind']
    claim = {'object_psnr_over_object_blind_db': trained['object_psnr'] - blind['object_psnr'],
             'psnr_over_object_blind_db': trained['psnr'] - blind['psnr']}
    summary = {'iterations': it, 'minutes': (time.time() - t0) / 60, 'stage_seconds': stages,
               **results, **claim, 'video_frames_decoded': frames}
    with open(os.path.join(args.out, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    print_summary(args.out, summary)
    return 0


def print_summary(out: str, summary: dict) -> None:
    """Where everything is, the held-out table and the claim against the object-blind render."""
    run_dir, video_dir = os.path.join(out, 'run'), os.path.join(out, 'video')
    print('\n== summary')
    print(f'source data    {out}/source')
    print(f'shards         {out}/shards  (dataset card: {out}/shards/README.md)')
    print(f'checkpoint     {run_dir}/model.pt  ({summary["iterations"]} iterations)')
    print(f'metrics        {run_dir}/metrics.jsonl')
    pictures = [f'{out}/heldout.png (inputs | SRT | truth | no objects)']
    pictures += [p for p in (f'{run_dir}/renders-val.png', f'{out}/contact_sheet.png')
                 if os.path.exists(p)]  # the run draws renders every visualize_every steps
    print('pictures       ' + ', '.join(pictures))
    print(f'video          {video_dir}/video.mp4 ({summary["video_frames_decoded"]} frames decoded '
          'back)')
    print(f'\nheld-out test scenes: {summary["trained"]["scenes"]} (full target views; per scene in '
          f'{out}/heldout_scenes.csv)')
    print(f'{"":28}{"PSNR (dB)":>10}{"objects (dB)":>14}{"SSIM":>8}')
    for name, key in (('SRT, trained', 'trained'), ('SRT, iteration 0', 'iteration_0'),
                      ('mean training image', 'mean_training_image'),
                      ('object-blind render', 'object_blind')):
        r = summary[key]
        print(f'{name:28}{r["psnr"]:>10.2f}{r["object_psnr"]:>14.2f}{r["ssim"]:>8.3f}')
    print(f'\nobject pixels: SRT {summary["object_psnr_over_object_blind_db"]:+.2f} dB over the '
          f'object-blind render; all pixels: {summary["psnr_over_object_blind_db"]:+.2f} dB')
    print('stages (s): ' + ', '.join(f'{k} {v:g}' for k, v in summary['stage_seconds'].items()))
    print(f'\ndone in {summary["minutes"]:.1f} minutes; summary in {out}/summary.json')


if __name__ == '__main__':
    sys.exit(main())
