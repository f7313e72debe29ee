"""CO3D v2-like categories (``--format co3d``): orbit sequences around an object, with foreground
masks, depth maps and valid-depth masks, written as CO3D v2 lays them out (co3d README, PyTorch3D
implicitron; docs/FORMATS: CO3D v2):

```
DIR/<category>/frame_annotations.jgz      gzip of a JSON list of FrameAnnotation (shuffled order)
DIR/<category>/sequence_annotations.jgz   gzip of a JSON list of SequenceAnnotation
DIR/<category>/set_lists/set_lists_fewview_dev.json    {"train"|"val"|"test": [[seq, frame_number, image_path]]}
DIR/<category>/set_lists/set_lists_manyview_dev_0.json its first sequence, frames split train/test
DIR/<category>/<sequence>/images/frameNNNNNN.jpg       JPEG, size per sequence (portrait or landscape)
DIR/<category>/<sequence>/masks/frameNNNNNN.png        8-bit L, P(foreground) * 255
DIR/<category>/<sequence>/depths/frameNNNNNN.jpg.geometric.png   uint16 PNG holding float16 bits of
                                                       depth / scale_adjustment (0 where none)
DIR/<category>/<sequence>/depth_masks/frameNNNNNN.png  1-bit PNG, depth valid
```

Frame annotations: ``frame_number`` 0..V-1 (file suffixes are ``frame_number + 1``, which CO3D
allows), ``frame_timestamp`` seconds, ``image{path, size [H, W]}``, ``depth{path, scale_adjustment,
mask_path}``, ``mask{path, mass}``, ``viewpoint{R, T, focal_length, principal_point,
intrinsics_format}``. ``R``, ``T`` are PyTorch3D's row-vector world-to-view transform
(``X_view = X_world @ R + T``, view axes +X left, +Y up, +Z forward); intrinsics alternate between
the legacy ``ndc_norm_image_bounds`` and ``ndc_isotropic`` over the sequences. Depth is z-depth
(along the optical axis) in world units. Sequence i (over all splits, in split order) goes to
category ``CATEGORIES[i % 2]``; fewview_dev's split of a sequence is the generator's split.
``co3d_sequence(seed, split, index)`` gives every camera exactly.
"""
from __future__ import annotations

import gzip
import io
import json
import math
import pathlib
from typing import Callable

import numpy as np
from PIL import Image

from pipeline import cameras as C
from pipeline.synthetic.common import WriteResult, png_bytes, render_all, resolve_splits, \
    tasks_of, write_marker
from pipeline.synthetic.raycast import render_views
from pipeline.synthetic.scene import STREAM_CAMERAS, sample_scene, scene_rng

CATEGORIES = ('synth_a', 'synth_b')
CO3D_VIEWS = 6
SIZES = ((48, 64), (64, 48), (54, 72))  # (H, W) per sequence
FORMATS_NDC = ('ndc_norm_image_bounds', 'ndc_isotropic')
PYTORCH3D_FROM_OPENCV = np.diag([-1.0, -1.0, 1.0])  # view axes: x left, y up (z forward in both)
_STYLE = 'msn'


def sequence_name(seed: int, split: str, index: int) -> str:
    """A CO3D-style sequence name (``<n>_<n>_<n>``), unique per (seed, split, index)."""
    rng = scene_rng(seed, split, index, STREAM_CAMERAS)
    return f'{100 + index}_{int(rng.integers(10000, 99999))}_{int(rng.integers(10000, 99999))}'


def co3d_sequence(seed: int, split: str, index: int, global_index: int,
                  num_views: int = CO3D_VIEWS) -> dict:
    """True cameras of a sequence: 'K' [v, 3, 3] pixels, 'world_from_cam' [v, 4, 4] OpenCV,
    'height', 'width', 'intrinsics_format', 'category', 'name', 'scale_adjustment' [v] and the
    PyTorch3D encoding 'R' [v, 3, 3], 'T' [v, 3], 'focal_length' [v, 2], 'principal_point' [v, 2]."""
    rng = scene_rng(seed, split, index, STREAM_CAMERAS)
    scene = sample_scene(_STYLE, seed, split, index)
    H, W = SIZES[global_index % len(SIZES)]
    fmt = FORMATS_NDC[(global_index // len(CATEGORIES)) % 2]
    target = scene.center[0]
    radius = rng.uniform(5.0, 7.0) * max(scene.radius[0], 0.5)
    elevation = math.radians(rng.uniform(15.0, 35.0))
    start = rng.uniform(0, 2 * math.pi)
    focal = min(H, W) * rng.uniform(0.9, 1.2)
    Ks, poses = [], []
    for v in range(num_views):
        a = start + 2 * math.pi * 0.8 * v / num_views
        eye = target + radius * np.array([math.cos(elevation) * math.cos(a),
                                          math.cos(elevation) * math.sin(a), math.sin(elevation)])
        poses.append(C.look_at(eye, target + rng.normal(0.0, 0.05, 3)))
        Ks.append(np.array([[focal * rng.uniform(0.99, 1.01), 0.0, W / 2 + rng.uniform(-2, 2)],
                            [0.0, focal, H / 2 + rng.uniform(-2, 2)], [0.0, 0.0, 1.0]]))
    K, world_from_cam = np.stack(Ks), np.stack(poses)
    enc = [pytorch3d_viewpoint(K[v], world_from_cam[v], H, W, fmt) for v in range(num_views)]
    return {'K': K, 'world_from_cam': world_from_cam, 'height': H, 'width': W,
            'intrinsics_format': fmt, 'category': CATEGORIES[global_index % len(CATEGORIES)],
            'name': sequence_name(seed, split, index),
            'scale_adjustment': rng.uniform(0.5, 2.0, num_views),
            **{k: np.stack([e[k] for e in enc]) for k in enc[0]}}


def pytorch3d_viewpoint(K: np.ndarray, world_from_cam: np.ndarray, height: int, width: int,
                        fmt: str) -> dict[str, np.ndarray]:
    """Encode an OpenCV camera (K pixels, world_from_cam) as a CO3D viewpoint (the generator's
    forward direction; readers implement the inverse on their own).

    PyTorch3D: ``X_view = X_world @ R + T`` with view = diag(-1, -1, 1) @ OpenCV camera, so
    ``R = R_cv^T F`` and ``T = F t_cv`` for the OpenCV ``cam_from_world = [R_cv | t_cv]``.
    Isotropic NDC: ``s = min(H, W) / 2``, ``f = (fx, fy) / s``, ``p = -((cx, cy) - (W, H) / 2) / s``;
    the legacy format divides by ``(W, H) / 2`` per axis instead.
    """
    cam_from_world = C.invert_pose(world_from_cam)
    F = PYTORCH3D_FROM_OPENCV
    R = cam_from_world[:3, :3].T @ F
    T = F @ cam_from_world[:3, 3]
    half = np.array([width, height]) / 2.0
    scale = half.min() if fmt == 'ndc_isotropic' else half
    focal = np.array([K[0, 0], K[1, 1]]) / scale
    principal = -(np.array([K[0, 2], K[1, 2]]) - half) / scale
    return {'R': R, 'T': T, 'focal_length': focal, 'principal_point': principal}


def _encode(task: tuple) -> dict:
    """Worker: render one sequence and encode its files (module level: picklable)."""
    seed, split, index, global_index = task
    seq = co3d_sequence(seed, split, index, global_index)
    scene = sample_scene(_STYLE, seed, split, index)
    r = render_views(scene, seq['K'], seq['world_from_cam'], seq['height'], seq['width'],
                     seed=seed, split=split, index=index)
    images, masks, depths, depth_masks, mass = [], [], [], [], []
    _, dirs = C.image_rays(seq['K'], seq['world_from_cam'], seq['height'], seq['width'])
    for v in range(len(seq['K'])):
        buf = io.BytesIO()
        Image.fromarray(r['rgb'][v]).save(buf, format='JPEG', quality=90)
        images.append(buf.getvalue())
        fg = r['object_id'][v] == 1  # the orbited object
        masks.append(png_bytes((fg * 255).astype(np.uint8)))
        mass.append(float(fg.sum()))
        # z-depth = ray distance * cos(angle to the optical axis)
        z = r['depth'][v] * (dirs[v] @ seq['world_from_cam'][v][:3, 2])
        valid = np.isfinite(z)
        stored = np.where(valid, z / seq['scale_adjustment'][v], 0.0).astype(np.float16)
        depths.append(png_bytes(stored.view(np.uint16)))
        buf = io.BytesIO()
        Image.fromarray(valid).save(buf, format='PNG')  # mode '1': a 1-bit PNG
        depth_masks.append(buf.getvalue())
    return {'seq': seq, 'images': images, 'masks': masks, 'depths': depths,
            'depth_masks': depth_masks, 'mass': mass}


def _frame_annotations(r: dict) -> list[dict]:
    seq = r['seq']
    cat, name = seq['category'], seq['name']
    out = []
    for v in range(len(seq['K'])):
        stem = f'frame{v + 1:06d}'
        out.append({
            'sequence_name': name, 'frame_number': v, 'frame_timestamp': 0.4 + v / 30.0,
            'image': {'path': f'{cat}/{name}/images/{stem}.jpg',
                      'size': [seq['height'], seq['width']]},
            'depth': {'path': f'{cat}/{name}/depths/{stem}.jpg.geometric.png',
                      'scale_adjustment': float(seq['scale_adjustment'][v]),
                      'mask_path': f'{cat}/{name}/depth_masks/{stem}.png'},
            'mask': {'path': f'{cat}/{name}/masks/{stem}.png', 'mass': r['mass'][v]},
            'viewpoint': {'R': seq['R'][v].tolist(), 'T': seq['T'][v].tolist(),
                          'focal_length': seq['focal_length'][v].tolist(),
                          'principal_point': seq['principal_point'][v].tolist(),
                          'intrinsics_format': seq['intrinsics_format']},
            'meta': {'frame_type': 'synthetic'}})
    return out


def _write_jgz(path: pathlib.Path, obj) -> None:
    """gzip with mtime 0: the same seed gives the same bytes."""
    with open(path, 'wb') as raw, gzip.GzipFile(fileobj=raw, mode='wb', mtime=0) as f:
        f.write(json.dumps(obj).encode())


def write_co3d(out_dir, num_scenes: int, seed: int = 0, *,
               split_sizes: dict[str, int] | None = None, workers: int | None = None,
               progress: Callable[[int], None] | None = None) -> WriteResult:
    """Write ``num_scenes`` CO3D-like sequences to ``out_dir`` (see the module docstring)."""
    root = pathlib.Path(out_dir)
    sizes = resolve_splits('co3d', num_scenes, split_sizes)
    tasks = [(seed, split, i, g) for g, (_, _, split, i) in enumerate(tasks_of('co3d', seed, sizes))]
    cats = {c: {'frames': [], 'sequences': [], 'fewview': {s: [] for s in ('train', 'val', 'test')},
                'manyview': {'train': [], 'test': []}} for c in CATEGORIES}
    scenes = {s: [] for s in sizes}
    num_images = image_bytes = 0
    for (_, split, _, _), r in zip(tasks, render_all(_encode, tasks, workers, progress)):
        seq = r['seq']
        cat, name = seq['category'], seq['name']
        base = root / cat / name
        frames = _frame_annotations(r)
        for sub in ('images', 'masks', 'depths', 'depth_masks'):
            (base / sub).mkdir(parents=True, exist_ok=True)
        for v, frame in enumerate(frames):
            for path, data in ((frame['image']['path'], r['images'][v]),
                               (frame['mask']['path'], r['masks'][v]),
                               (frame['depth']['path'], r['depths'][v]),
                               (frame['depth']['mask_path'], r['depth_masks'][v])):
                (root / path).write_bytes(data)
            num_images += 1
            image_bytes += len(r['images'][v])
        c = cats[cat]
        c['frames'] += frames
        c['sequences'].append({'sequence_name': name, 'category': cat,
                               'video': {'path': f'{cat}/{name}/video.mp4',
                                         'length': len(frames) / 30.0},
                               'point_cloud': None, 'viewpoint_quality_score': 1.0})
        c['fewview'][split] += [[name, f['frame_number'], f['image']['path']] for f in frames]
        if not c['manyview']['train']:  # manyview_dev_0: the category's first sequence
            for f in frames:
                c['manyview']['train' if f['frame_number'] % 3 else 'test'].append(
                    [name, f['frame_number'], f['image']['path']])
        scenes[split].append(f'{cat}/{name}')
    for cat, c in cats.items():
        if not c['sequences']:
            continue
        order = np.random.default_rng(np.random.SeedSequence([seed, 7])).permutation(len(c['frames']))
        _write_jgz(root / cat / 'frame_annotations.jgz', [c['frames'][i] for i in order])
        _write_jgz(root / cat / 'sequence_annotations.jgz', c['sequences'])
        (root / cat / 'set_lists').mkdir(exist_ok=True)
        for subset, lists in (('fewview_dev', c['fewview']), ('manyview_dev_0', c['manyview'])):
            (root / cat / 'set_lists' / f'set_lists_{subset}.json').write_text(json.dumps(lists))
    root.mkdir(parents=True, exist_ok=True)
    write_marker(root, 'co3d', seed, scenes)
    return WriteResult('co3d', root, root, scenes, num_images, image_bytes)
