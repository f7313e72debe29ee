"""ObSuRF format (variant ``clevr3d`` or ``msn``): ``DIR/metadata.npz`` (compressed) with per-scene
arrays of leading length 100000 and ``DIR/images/img_<scene>_<view>.png`` (240x320 RGBA, alpha 255, 3
views), mirroring the test vector ``tests/data/testvectors/sources/clevr3d``, and the instance masks
OSRT reads, ``DIR/masks/masks_<scene>_<view>.png`` (8-bit grey: 0 background and ground, i + 1 for
object i, i.e. the object's metadata slot + 1).

The reference selects scenes by FIXED index ranges (CLEVR3D train 0-70000, val 70000-75000, test
85000-100000; ObSuRF-MSN train 0-80000, val 80000-80500, test 90000-100000) and drops scenes with
more than ``max_objects`` objects, so a small set puts its scenes at the start of each range and
marks every unused row as having ALL object slots filled (``shape`` = 1), with no images and zero
cameras. For CLEVR3D (11 slots, 3-6 objects per scene) the reference's default ``max_objects=6``
then selects exactly the written scenes. ObSuRF-MSN has only 5 slots, which never exceed 6: read it
with ``max_objects=4`` (its scenes have 2-4 objects), otherwise the unused rows of each range are
selected too and have no images.

Metadata arrays (S = 11 or 5 object slots): ``shape`` int64 [100000, S] (0 empty slot, else 1
sphere, 2 box, 3 cylinder); ``camera_pos`` float32 [100000, 3, 3] (the views look at the origin, z
up); ``color`` float32 [100000, S, 3] (RGB in [0, 1]); ``size`` float32 [100000, S] (footprint
radius); ``height`` float32 [100000, S] (full height); ``3d_coords`` float32 [100000, S, 3] (object
centre); ``rotation`` float32 [100000, S] (yaw about +z, degrees).
"""
from __future__ import annotations

import pathlib
from typing import Callable

import numpy as np

from pipeline.synthetic.common import (OBSURF, OBSURF_ROWS, OBSURF_VIEWS, WriteResult, png_bytes,
                                       render_all, render_scene, resolve_splits, save_npz,
                                       tasks_of, write_marker)
from pipeline.synthetic.scene import Scene


def _encode(task: tuple[str, int, str, int]) -> dict:
    """Worker: render one scene and encode what ObSuRF stores (module level: picklable)."""
    fmt, seed, split, index = task
    r = render_scene(fmt, seed, split, index)
    alpha = np.full(r['rgb'].shape[1:3] + (1,), 255, dtype=np.uint8)
    return {'pngs': [png_bytes(np.concatenate([im, alpha], axis=-1)) for im in r['rgb']],
            'masks': [png_bytes(ids) for ids in r['object_id']],
            'camera_pos': r['camera_pos'], 'objects': _object_fields(r['scene'])}


def _object_fields(scene: Scene) -> dict[str, np.ndarray]:
    """The per-object ObSuRF metadata of one scene (arrays of length num_objects)."""
    return {'shape': scene.category.astype(np.int64), 'color': scene.color.astype(np.float32),
            'size': scene.radius.astype(np.float32),
            'height': (2 * scene.half_height).astype(np.float32),
            '3d_coords': scene.center.astype(np.float32),
            'rotation': np.degrees(scene.yaw).astype(np.float32)}


def write_obsurf(out_dir, num_scenes: int, seed: int = 0, *, variant: str = 'clevr3d',
                 split_sizes: dict[str, int] | None = None, workers: int | None = None,
                 progress: Callable[[int], None] | None = None) -> WriteResult:
    """Write ``num_scenes`` ObSuRF-format scenes (``variant`` 'clevr3d' or 'msn') to ``out_dir``:
    scene i of a split is metadata row ``range start + i`` (see the module docstring)."""
    if variant not in OBSURF:
        raise ValueError(f'ObSuRF variant must be one of {sorted(OBSURF)}, got {variant!r}')
    fmt = 'obsurf' if variant == 'clevr3d' else 'obsurf-msn'
    _, slots, ranges = OBSURF[variant]
    root = pathlib.Path(out_dir)
    sizes = resolve_splits(fmt, num_scenes, split_sizes)
    for split, n in sizes.items():
        lo, hi = ranges[split]
        if n > hi - lo:
            raise ValueError(f'{variant} split {split} holds at most {hi - lo} scenes '
                             f'(rows {lo}-{hi}), asked for {n}')
    meta = {'shape': np.ones((OBSURF_ROWS, slots), dtype=np.int64),  # unused rows: all slots full
            'camera_pos': np.zeros((OBSURF_ROWS, OBSURF_VIEWS, 3), dtype=np.float32),
            'color': np.zeros((OBSURF_ROWS, slots, 3), dtype=np.float32),
            'size': np.zeros((OBSURF_ROWS, slots), dtype=np.float32),
            'height': np.zeros((OBSURF_ROWS, slots), dtype=np.float32),
            '3d_coords': np.zeros((OBSURF_ROWS, slots, 3), dtype=np.float32),
            'rotation': np.zeros((OBSURF_ROWS, slots), dtype=np.float32)}
    tasks = tasks_of(fmt, seed, sizes)
    (root / 'images').mkdir(parents=True, exist_ok=True)
    (root / 'masks').mkdir(parents=True, exist_ok=True)
    scenes = {s: [] for s in sizes}
    num_images = image_bytes = 0
    for (_, _, split, i), r in zip(tasks, render_all(_encode, tasks, workers, progress)):
        row = ranges[split][0] + i
        for v, data in enumerate(r['pngs']):
            (root / 'images' / f'img_{row}_{v}.png').write_bytes(data)
            num_images += 1
            image_bytes += len(data)
        for v, data in enumerate(r['masks']):
            (root / 'masks' / f'masks_{row}_{v}.png').write_bytes(data)
        meta['camera_pos'][row] = r['camera_pos']
        n = len(r['objects']['shape'])
        if n > slots:
            raise AssertionError(f'scene with {n} objects does not fit {slots} slots')
        meta['shape'][row] = 0
        for k, v in r['objects'].items():
            meta[k][row, :n] = v
        scenes[split].append(str(row))
    save_npz(root / 'metadata.npz', meta, compress=True)
    write_marker(root, fmt, seed, scenes, reader_max_objects=6 if variant == 'clevr3d' else 4)
    return WriteResult(fmt, root, root, scenes, num_images, image_bytes)
