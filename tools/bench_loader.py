#!/usr/bin/env python
"""Loader throughput per core: SRT training batches from shards vs image decoding alone vs the
reference implementation's loading path, for MSN-, NMR-, CLEVR3D- and RE10K-shaped data, in one run.

    python tools/bench_loader.py [--workdir /tmp/srt_bench] [--seconds 8]

Data: generated with tools/make_synthetic.py (msn 128x128 x10, nmr 64x64 x24, obsurf 240x320 RGBA
x3) and converted with tools/convert_*.py, cached in --workdir; re10k: pixelSplat chunks of clips
of --frames 360x640 JPEG frames (quality 90; 8 distinct rendered frames repeated, RE10K's ~50 KB
each), chunks closed at 1e8 bytes as real_estate_10k_tools does, converted with
tools/convert_pixelsplat.py (which writes each shard's member index, <shard>.idx). Rows, per core
(one process; rates are items per CPU second of the process, so TensorFlow's threads count too;
all rows but the reference measured side by side, in turns of 0.5 s, --seconds each in all):
  decode only     the images an item uses (every view of its scene: NMR 24, CLEVR3D 3, MSN 10;
                  RE10K its 2 input + 4 target views) decoded with the fastest decoder, bytes
                  already in memory: the limit of a loader that decodes per item (ours decodes a
                  scene once for all of its items, which is why it can pass this limit for NMR and
                  CLEVR3D)
  ours            srt.loader.TrainStream (on pipeline.multiview): tar reading, decoding, view choice,
                  canonical frames and num_points target pixels per item, collated batches (rays
                  are computed on the training device from the shipped cameras)
  ours + rays     the same, plus srt.data.to_model_inputs on the CPU (float images, every ray)
  generic         pipeline.multiview.MultiViewStream (what srt.loader.TrainStream is built on)
                  with pixelSplat's bounded sampler, 2 context + 4 target views (gap 1/3 of the
                  views to all of them, no warm-up), uint8 images [v, 3, h, w] + K + c2w; one
                  sample per scene, only the chosen views decoded (NMR: ~5.5 of 24 views per
                  item, where the SRT stream decodes 1 view per item)
  generic, SRT views  the same generic stream with SRT's view choice (srt.data.reference_sampler,
                  SRT's items per scene) through pipeline.viewsample.ViewSamples: whole uint8
                  views + K + c2w per item where SRT's item builder samples num_points pixels and
                  canonical frames; "generic SRT views / ours" is the issue-12 comparison of the
                  generic path with the SRT stream on SRT-shaped data
  reference       the reference's path re-implemented: NMR / CLEVR3D per item every PNG read from
                  its file and numpy rays of every view; MSN a tf.data pipeline over the TFRecords
                  that decodes the PNGs and computes per-pixel rays as sunds does; RE10K the
                  pixelSplat way: torch.load of each chunk, its cameras converted, then per item
                  the 6 views decoded as its convert_images does (PIL + ToTensor; its 256x256
                  crop shim not counted)
An item is what the model sees per scene slot of a batch: NMR and CLEVR3D (scene, input view) pairs,
MSN and RE10K scenes (RE10K: 2 random input views at 360x640, 4 random targets).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import numpy as np  # noqa: E402

SETS = {  # name: (generator format, converter, dataset, scenes)
    'msn': ('msn', 'convert_msn.py', 'msn', 300),
    'nmr': ('nmr', 'convert_nmr.py', 'nmr', 120),
    'clevr3d': ('obsurf', 'convert_obsurf.py', 'clevr3d', 150),
    're10k': (None, 'convert_pixelsplat.py', 're10k', 40),
}
RE10K_SIZE, RE10K_INPUTS, RE10K_TARGETS, CHUNK_BYTES = (360, 640), 2, 4, int(1e8)
VIEWS = {'msn': 10, 'nmr': 24, 'clevr3d': 3}
NUM_POINTS = 8192
BATCH = 8


def prepare(workdir: str, name: str, scenes: int | None = None, frames: int = 100
            ) -> tuple[str, str]:
    fmt, tool, _, default_scenes = SETS[name]
    scenes = scenes or default_scenes
    src, out = os.path.join(workdir, f'{name}_src'), os.path.join(workdir, f'{name}_shards')
    if name == 're10k':
        src = os.path.join(workdir, f're10k_{scenes}x{frames}', 're10k')
        out = os.path.join(workdir, f're10k_{scenes}x{frames}', 'shards')
        if not os.path.isdir(src):
            write_re10k_chunks(src, scenes, frames)
    elif not os.path.isdir(src):
        subprocess.run([sys.executable, os.path.join(ROOT, 'tools/make_synthetic.py'), '--format',
                        fmt, '--out', src, '--scenes', str(scenes)], check=True)
    per_shard = '8' if name == 're10k' else '25'
    if not os.path.exists(os.path.join(out, 'train.manifest.json')):  # converted: keep (any schema)
        subprocess.run([sys.executable, os.path.join(ROOT, 'tools', tool), '--src', src, '--out',
                        out, '--splits', 'train', '--scenes-per-shard', per_shard, '--no-progress'],
                       check=True, stdout=subprocess.DEVNULL)
    return src, out


def write_re10k_chunks(root: str, scenes: int, frames: int) -> None:
    """RE10K-shaped pixelSplat chunks: ``scenes`` clips of ``frames`` 360x640 JPEGs (8 distinct
    renders of one clip, repeated), chunks closed once they hold >= 1e8 image bytes."""
    import torch
    from pipeline.synthetic import jpeg_bytes, render_views, sample_scene, scene_rng, video_cameras
    h, w = RE10K_SIZE
    n = min(8, frames)
    K, poses = video_cameras(scene_rng(0, 'train', 0, 1), n, h, w)
    jpegs = [jpeg_bytes(im) for im in render_views(sample_scene('msn', 0, 'train', 0), K, poses, h,
                                                   w)['rgb']]
    rows = np.zeros((n, 18), np.float32)
    rows[:, :4] = K[:, [0, 1, 0, 1], [0, 1, 2, 2]] / np.array([w, h, w, h])
    rows[:, 6:] = np.linalg.inv(poses)[:, :3].reshape(n, 12)
    os.makedirs(os.path.join(root, 'train'))
    chunk, size, count = [], 0, 0
    for s in range(scenes):
        pick = [f % n for f in range(frames)]
        chunk.append({'url': '', 'timestamps': torch.arange(frames) * 100100,
                      'cameras': torch.from_numpy(rows[pick]), 'key': f'{s:016x}',
                      'images': [torch.frombuffer(bytearray(jpegs[i]), dtype=torch.uint8)
                                 for i in pick]})
        size += sum(len(jpegs[i]) for i in pick)
        if size >= CHUNK_BYTES or s == scenes - 1:
            torch.save(chunk, os.path.join(root, 'train', f'{count:0>6}.torch'))
            chunk, size, count = [], 0, count + 1


def timed_together(fns: dict, seconds: float, slice_s: float = 0.5) -> dict:
    """Items per CPU second of this process (all its threads) of each row ``fn() -> items``, the
    rows side by side: turns of ``slice_s`` seconds each, in rotation, ``seconds`` per row in all,
    so that a machine whose speed drifts (a shared VM) slows every row alike and their ratios hold
    (one row and ``slice_s = seconds``: one turn)."""
    for fn in fns.values():
        fn()  # warm-up
    items, cpu = dict.fromkeys(fns, 0), dict.fromkeys(fns, 0.0)
    for _ in range(max(1, round(seconds / slice_s))):
        for name, fn in fns.items():
            cpu0, wall0 = time.process_time(), time.perf_counter()
            while time.perf_counter() - wall0 < slice_s:
                items[name] += fn()
            cpu[name] += time.process_time() - cpu0
    return {name: items[name] / cpu[name] for name in fns}


# ----------------------------------------------------------------------------- rows

def decode_only(shards: str, views_per_item: int | None = None):
    """Decoding the images of 40 items: every view of a scene, or ``views_per_item`` of them."""
    from pipeline.decode import decode_image
    from pipeline.reader import iter_shard, shard_urls
    from pipeline.schema import rgb_view
    images = [[v for k, v in sorted(s.items()) if rgb_view(k) is not None][:views_per_item]
              for url in shard_urls(shards, 'train') for s in iter_shard(url)]
    images = (images * 40)[:40]

    def run():
        for scene in images:
            for data in scene:
                decode_image(data, 3)
        return 40
    return run


def ours(shards: str, dataset: str, rays: bool):
    from srt.data import DataConfig, to_model_inputs
    from srt.loader import TrainStream, shard_table
    generic = {'num_input_views': RE10K_INPUTS, 'num_target_views': RE10K_TARGETS} \
        if dataset == 're10k' else {}
    cfg = DataConfig(dataset=dataset, num_points=NUM_POINTS,
                     downsample=1 if dataset == 'clevr3d' else None, **generic)
    stream = iter(TrainStream(cfg, shard_table(shards, 'train'), BATCH, shards_per_visit=4,
                              item_buffer=64))

    def run():
        for _ in range(5):
            batch = next(stream)
            if rays:
                to_model_inputs(batch)
        return 5 * BATCH
    return run


def generic(shards: str, num_views: int):
    from pipeline.multiview import MultiViewStream, split_shards
    from pipeline.views import BoundedSampler
    from pipeline.viewsample import ViewSamples
    sampler = BoundedSampler(num_context_views=2, num_target_views=4, warm_up_steps=0,
                             min_distance_between_context_views=max(1, (num_views - 1) // 3),
                             max_distance_between_context_views=num_views - 1)
    stream = iter(MultiViewStream(split_shards(shards, 'train'), BATCH, ViewSamples(sampler),
                                  shards_per_visit=4, buffer=64))

    def run():
        for _ in range(5):
            next(stream)
        return 5 * BATCH
    return run


def generic_srt_views(shards: str, dataset: str, num_views: int):
    from pipeline.multiview import MultiViewStream, split_shards
    from pipeline.viewsample import ViewSamples
    from srt.data import DataConfig, items_per_scene, reference_sampler
    cfg = DataConfig(dataset=dataset, num_points=NUM_POINTS)
    stream = iter(MultiViewStream(split_shards(shards, 'train'), BATCH,
                                  ViewSamples(reference_sampler(cfg)), shards_per_visit=4,
                                  buffer=64, samples_per_scene=items_per_scene(cfg, num_views)))

    def run():
        for _ in range(5):
            next(stream)
        return 5 * BATCH
    return run


def reference_files(src: str, dataset: str):
    """The reference's map-style loaders (NMR, CLEVR3D): per item, every view's PNG read from its
    file, float conversion, numpy rays of every view, canonical transform, target sampling."""
    from PIL import Image  # the reference reads with imageio, which decodes with Pillow

    from pipeline.sources.nmr import NMRSource
    from pipeline.sources.obsurf import ObsurfSource

    def imread(path):
        return np.asarray(Image.open(path))

    rng = np.random.default_rng(0)
    if dataset == 'nmr':
        source = NMRSource(src)
        scenes = source.scene_refs('train')
        rot = np.array([[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], np.float64)
        xmap, ymap = np.meshgrid(np.linspace(-1, 1, 64), np.linspace(-1, 1, 64))

        def item(i):
            scene_idx, view = i % len(scenes), (i // len(scenes)) % 24
            path = os.path.join(src, scenes[scene_idx])
            images = np.stack([imread(os.path.join(path, 'image', f'{v:04d}.png'))
                               for v in range(24)]).astype(np.float32) / 255.
            cams = dict(np.load(os.path.join(path, 'cameras.npz')))
            rays, pos = [], []
            for v in range(24):
                wmi = rot @ cams[f'world_mat_inv_{v}']
                d = np.stack([xmap, ymap, np.ones_like(xmap), np.zeros_like(xmap)], -1)
                d = np.einsum('nm,...m->...n', wmi @ cams[f'camera_mat_inv_{v}'], d)[..., :3]
                rays.append(d / np.linalg.norm(d, axis=-1, keepdims=True))
                pos.append(wmi[:3, 3])
            rays, pos = np.stack(rays).astype(np.float32), np.stack(pos).astype(np.float32)
            T = (cams[f'world_mat_{view}'] @ rot.T).astype(np.float32)
            rays = np.einsum('nm,...m->...n', T[:3, :3], rays)
            targets = [v for v in range(24) if v != view]
            flat_rays = rays[targets].reshape(-1, 3)
            flat_px = images[targets].reshape(-1, 3)
            idx = rng.choice(len(flat_rays), NUM_POINTS, replace=False)
            return flat_rays[idx], flat_px[idx]
    else:
        from pipeline import cameras as C
        source = ObsurfSource(src, 'clevr3d')
        scenes = source.scene_refs('train')
        positions = source.metadata['camera_pos']

        def item(i):
            scene, view = scenes[i % len(scenes)], (i // len(scenes)) % 3
            imgs = [imread(os.path.join(src, 'images', f'img_{scene}_{v}.png'))[..., :3]
                    .astype(np.float32) / 255 for v in range(3)]
            rays = np.stack([C.image_rays(*C.obsurf_to_opencv(positions[scene, v]), 240, 320)[1]
                             for v in range(3)]).astype(np.float32)
            T = C.canonical_from_look_at(positions[scene, view]).astype(np.float32)
            rays = np.einsum('nm,...m->...n', T[:3, :3], rays)
            flat_rays, flat_px = rays.reshape(-1, 3), np.stack(imgs).reshape(-1, 3)
            idx = rng.choice(len(flat_rays), NUM_POINTS, replace=False)
            return flat_rays[idx], flat_px[idx], imgs[view][1::2, 1::2]

    counter = [0]

    def run():
        for _ in range(4):
            item(counter[0])
            counter[0] += 1
        return 4
    return run


def pixelsplat_way(src: str):
    """pixelSplat's loader re-implemented (src/dataset/dataset_re10k.py:88-139): torch.load of each
    chunk, convert_poses of every scene (:179-200), per item 2 context + 4 target views decoded by
    convert_images (:202-210: PIL.Image.open + ToTensor) and the shape check; the view sampler's
    draw is a random choice here, the crop shim (a 256x256 resize) is not counted."""
    import io

    import torch
    import torchvision.transforms as tf
    from PIL import Image
    paths = sorted(os.path.join(src, 'train', f) for f in os.listdir(os.path.join(src, 'train')))
    to_tensor, rng, state = tf.ToTensor(), np.random.default_rng(0), {'chunk': 0}

    def convert_poses(poses):
        b = poses.shape[0]
        intrinsics = torch.eye(3, dtype=torch.float32).repeat(b, 1, 1)
        intrinsics[:, 0, 0], intrinsics[:, 1, 1] = poses[:, 0], poses[:, 1]
        intrinsics[:, 0, 2], intrinsics[:, 1, 2] = poses[:, 2], poses[:, 3]
        w2c = torch.eye(4, dtype=torch.float32).repeat(b, 1, 1)
        w2c[:, :3] = poses[:, 6:].reshape(b, 3, 4)
        return w2c.inverse(), intrinsics

    def run():
        # pixelSplat calls plain torch.load (weights_only by default since torch 2.6): the same load
        chunk = torch.load(paths[state['chunk'] % len(paths)], weights_only=True)
        state['chunk'] += 1
        for example in chunk:
            convert_poses(example['cameras'])
            views = rng.choice(len(example['images']), RE10K_INPUTS + RE10K_TARGETS, replace=False)
            images = torch.stack([to_tensor(Image.open(io.BytesIO(
                example['images'][v].numpy().tobytes()))) for v in views])
            assert images.shape[1:] == (3, *RE10K_SIZE)
        return len(chunk)
    return run


def reference_msn(src: str):
    """The reference's MSN path: tf.data over the TFRecords, PNG decoding and per-pixel rays as
    sunds computes them (pinhole through pixel centres, scene_from_camera = pose * inv(extr))."""
    from pipeline.sources.msn import import_tensorflow
    tf = import_tensorflow()
    import tensorflow_datasets as tfds

    from pipeline.sources.msn import find_dataset_dir
    from pipeline.sources import msn as msn_source  # noqa: F401
    builder = tfds.builder_from_directory(find_dataset_dir(src))
    ds = builder.as_dataset(split='train', shuffle_files=False)

    def rays(ex):
        out = {'color_image': [], 'ray_origins': [], 'ray_directions': []}
        for name in sorted(ex['cameras']):
            cam = ex['cameras'][name]
            img = cam['color_image']
            h, w = tf.shape(img)[0], tf.shape(img)[1]
            u, v = tf.meshgrid(tf.range(w), tf.range(h))
            pix = tf.cast(tf.stack([u, v], -1), tf.float32) + 0.5
            pts = tf.concat([pix, tf.ones_like(pix[..., :1])], -1)
            d_cam = tf.linalg.normalize(tf.einsum('ij,hwj->hwi', tf.linalg.inv(cam['intrinsics']['K']),
                                                  pts), axis=-1)[0]
            R = tf.matmul(ex['pose']['R'], cam['extrinsics']['R'], transpose_b=True)
            t = ex['pose']['t'] - tf.linalg.matvec(R, cam['extrinsics']['t'])
            d = tf.linalg.normalize(tf.einsum('ij,hwj->hwi', R, d_cam), axis=-1)[0]
            out['color_image'].append(img)
            out['ray_origins'].append(tf.broadcast_to(t, tf.shape(d)))
            out['ray_directions'].append(d)
        return {k: tf.stack(v) for k, v in out.items()}

    from srt.data import NUM_MSN_INPUT_VIEWS
    from pipeline import cameras as C
    stream = iter(ds.map(rays, num_parallel_calls=tf.data.AUTOTUNE).repeat().prefetch(2)
                  .as_numpy_iterator())
    rng = np.random.default_rng(0)

    def prep(data):  # the reference's MultishapenetDataset.prep_item
        inputs = rng.choice(10, NUM_MSN_INPUT_VIEWS, replace=False)
        targets = np.array(sorted(set(range(10)) - set(inputs)))
        img = data['color_image'].astype(np.float32) / 255.
        T = C.canonical_from_rays(data['ray_origins'][inputs[0]][0, 0],
                                  data['ray_directions'][inputs[0]]).astype(np.float32)
        input_rays = np.einsum('nm,...m->...n', T[:3, :3], data['ray_directions'][inputs])
        flat_rays = data['ray_directions'][targets].reshape(-1, 3)
        idx = rng.choice(len(flat_rays), NUM_POINTS, replace=False)
        return img[inputs], input_rays, np.einsum('nm,...m->...n', T[:3, :3], flat_rays[idx]), \
            img[targets].reshape(-1, 3)[idx]

    def run():
        for _ in range(4):
            prep(next(stream))
        return 4
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('--workdir', default='/tmp/srt_bench_loader', help='cache of generated data')
    p.add_argument('--seconds', type=float, default=8.0, help='measuring time per cell')
    p.add_argument('--sets', nargs='+', default=list(SETS), choices=list(SETS))
    p.add_argument('--scenes', type=int, help='scenes to generate per set (default: per set)')
    p.add_argument('--frames', type=int, default=100, help='re10k: frames per clip (default 100)')
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    os.makedirs(args.workdir, exist_ok=True)
    from pipeline.decode import DECODER
    print(f'decoder: {DECODER}; {NUM_POINTS} target points per item, batches of {BATCH}; '
          f'rates are items per CPU second (one process)')
    rows = []
    for name in args.sets:
        src, shards = prepare(args.workdir, name, args.scenes, args.frames)
        dataset = SETS[name][2]
        per_item = RE10K_INPUTS + RE10K_TARGETS if name == 're10k' else None
        reference = {'msn': lambda: reference_msn(src), 're10k': lambda: pixelsplat_way(src)}.get(
            name, lambda: reference_files(src, dataset))
        together = {'decode': decode_only(shards, per_item), 'ours': ours(shards, dataset, False),
                    'generic': generic(shards, VIEWS.get(name, args.frames)),
                    'ours_rays': ours(shards, dataset, True)}
        if name in VIEWS:  # SRT's view choice exists for SRT's datasets only (RE10K: generic mode)
            together['generic_srt'] = generic_srt_views(shards, dataset, VIEWS[name])
        row = {'set': name, 'generic_srt': None, **timed_together(together, args.seconds)}
        # Apart: TensorFlow's prefetching threads (MSN) would run into the other rows' turns.
        row['reference'] = timed_together({'reference': reference()}, args.seconds,
                                          args.seconds)['reference']
        rows.append(row)
        print(f'{name}: done', flush=True)
    print()
    print('| shape | decode only (limit) | ours | ours / limit | generic, SRT views | '
          'generic SRT views / ours | generic (pixelSplat 2+4) | generic / ours | ours + CPU rays | '
          'reference | ours / reference |')
    print('|---|---|---|---|---|---|---|---|---|---|---|')
    for r in rows:
        print(f'| {r["set"]} | {r["decode"]:,.0f} | {r["ours"]:,.0f} | {r["ours"] / r["decode"]:.2f}x | '
              + (f'{r["generic_srt"]:,.0f} | {r["generic_srt"] / r["ours"]:.2f}x | '
                 if r['generic_srt'] is not None else '- | - | ') +
              f'{r["generic"]:,.0f} | {r["generic"] / r["ours"]:.2f}x | '
              f'{r["ours_rays"]:,.0f} | {r["reference"]:,.1f} | {r["ours"] / r["reference"]:.0f}x |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
