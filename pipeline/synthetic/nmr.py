"""NMR (DVR) format: ``DIR/metadata.yaml`` (class id -> {id, name}); per class
``DIR/<class>/softras_{train,val,test}.lst``; per scene ``DIR/<class>/<scene>/image/0000.png ..
0023.png`` (64x64 RGB, white background) and ``cameras.npz`` with float64 4x4 ``world_mat_i``,
``camera_mat_i``, ``world_mat_inv_i``, ``camera_mat_inv_i`` (``cameras.opencv_to_nmr``; camera_mat
= diag(2.175, 2.175, 1, 1)). Classes: the main object's kind (``NMR_CLASSES``). Mirrors the test
vector ``tests/data/testvectors/sources/nmr``, so the reference loader and ``pipeline.sources.nmr``
read it unchanged."""
from __future__ import annotations

import pathlib
from typing import Callable

import yaml

from pipeline.synthetic.common import (NMR_CLASSES, WriteResult, png_bytes, render_all,
                                       render_scene, resolve_splits, save_npz, tasks_of,
                                       write_marker)


def _encode(task: tuple[str, int, str, int]) -> dict:
    """Worker: render one scene and encode what NMR stores (module level: picklable)."""
    fmt, seed, split, index = task
    r = render_scene(fmt, seed, split, index)
    return {'class_id': list(NMR_CLASSES)[int(r['scene'].kind[0])],
            'pngs': [png_bytes(im) for im in r['rgb']], 'nmr': r['nmr']}


def write_nmr(out_dir, num_scenes: int, seed: int = 0, *, split_sizes: dict[str, int] | None = None,
              workers: int | None = None, progress: Callable[[int], None] | None = None
              ) -> WriteResult:
    """Write ``num_scenes`` NMR-format scenes to ``out_dir`` (see the module docstring)."""
    root = pathlib.Path(out_dir)
    sizes = resolve_splits('nmr', num_scenes, split_sizes)
    tasks = tasks_of('nmr', seed, sizes)
    lists = {c: {s: [] for s in ('train', 'val', 'test')} for c in NMR_CLASSES}
    scenes = {s: [] for s in sizes}
    num_images = image_bytes = 0
    number = 0
    for (_, _, split, _), r in zip(tasks, render_all(_encode, tasks, workers, progress)):
        name = f'scene{number:05d}'
        number += 1
        scene_dir = root / r['class_id'] / name
        (scene_dir / 'image').mkdir(parents=True, exist_ok=True)
        for v, data in enumerate(r['pngs']):
            (scene_dir / 'image' / f'{v:04d}.png').write_bytes(data)
            num_images += 1
            image_bytes += len(data)
        save_npz(scene_dir / 'cameras.npz', {f'{k}_{v}': m[k] for v, m in enumerate(r['nmr'])
                                             for k in ('world_mat', 'camera_mat', 'world_mat_inv',
                                                       'camera_mat_inv')}, compress=False)
        lists[r['class_id']][split].append(name)
        scenes[split].append(f'{r["class_id"]}/{name}')
    root.mkdir(parents=True, exist_ok=True)
    meta = {c: {'id': c, 'name': n} for c, n in NMR_CLASSES.items()}
    (root / 'metadata.yaml').write_text(yaml.safe_dump(meta, sort_keys=False))
    for c, per_split in lists.items():
        (root / c).mkdir(exist_ok=True)
        for split, names in per_split.items():
            (root / c / f'softras_{split}.lst').write_text(''.join(n + '\n' for n in names))
    write_marker(root, 'nmr', seed, scenes)
    return WriteResult('nmr', root, root, scenes, num_images, image_bytes)
