"""Videos of a scene from novel cameras (the command line; the work is in ``srt.video``)::

    python -m srt.render --shards shards/msn --checkpoint runs/msn_srt/model.pt --scene 3 \
        --motion rotate_and_closeup --fade --num-frames 180

The volumetric decoder renders with the run's near/far and sample counts (``srt.runtime``);
``--segmentation`` also writes an OSRT model's slot segmentation (``segmentation.mp4``).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from pipeline.reader import ShardError
from srt import runtime
from srt.checkpoint import CheckpointError, load_for_evaluation
from srt.video import MOTIONS, load_scene, render_motion


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description='Render a video of a scene with a trained SRT.')
    p.add_argument('--shards', required=True, help='shard directory')
    p.add_argument('--checkpoint', required=True, help='model.pt of a run (or a reference file)')
    p.add_argument('--config', help='YAML config for a reference checkpoint')
    p.add_argument('--split', default='val', help='split of the scene (default val)')
    p.add_argument('--scene', default='0', help='scene key, or the reference loader\'s scene index')
    p.add_argument('--motion', choices=MOTIONS, default='rotate')
    p.add_argument('--num-frames', type=int, default=360)
    p.add_argument('--fade', action='store_true', help='ease in and out')
    p.add_argument('--height', type=int, help='frame height (default: the input view\'s)')
    p.add_argument('--width', type=int, help='frame width (default: the input view\'s)')
    p.add_argument('--out', help='output directory (default: <run dir>/render/<motion>/<scene>)')
    p.add_argument('--precision', choices=('fp32', 'bf16'), default='fp32')
    p.add_argument('--segmentation', action='store_true', help='also render the slot segmentation '
                   '(OSRT): segmentations/ frames and segmentation.mp4')
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, str]:
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    model, cfg, _ = load_for_evaluation(args.checkpoint, args.shards, args.config, device)
    try:
        scene = load_scene(args.shards, args.split, args.scene)
    except KeyError as e:  # its message names the scene and the split
        raise ValueError(e.args[0]) from None
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), 'render',
                                   args.motion, scene.key)
    return render_motion(model, scene, cfg.data, args.motion, args.num_frames, out, args.height,
                         args.width, args.fade, device, runtime.render_kwargs(cfg, args.shards),
                         cfg.training.seed, runtime.autocast(device, args.precision),
                         segmentation=args.segmentation)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except (CheckpointError, ShardError, FileNotFoundError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    for k, v in result.items():
        print(f'{k}: {v}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
