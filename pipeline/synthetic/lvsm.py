"""LVSM scenes as its preprocessing writes them (Haian-Jin/LVSM ``process_data.py``):
``DIR/<split>/images/<scene>/<idx:05d>.png`` (RGB PNG), ``DIR/<split>/metadata/<scene>.json``
(``{"scene_name", "frames": [{"image_path", "fxfycxcy": [fx, fy, cx, cy] in pixels, "w2c": 4x4
world-to-camera, OpenCV}]}``, indented by 4) and ``DIR/<split>/full_list.txt`` (the scene JSONs'
absolute paths, sorted). ``image_path`` is absolute, as LVSM's default absolute output directory
makes it. Splits ``train`` and ``test``. Scenes: the hand-held clips of the 're10k' format
(``rigs.video_cameras``; 8-14 frames at 72x128, scene 1 of each split at 60x80)."""
from __future__ import annotations

import json
import pathlib
from typing import Callable

from pipeline.synthetic.common import (WriteResult, png_bytes, render_all, render_scene,
                                       resolve_splits, tasks_of, write_marker)
from pipeline.synthetic.re10k import video_key


def _encode(task: tuple) -> dict:
    """Worker: render one clip and encode what LVSM stores (module level: picklable)."""
    fmt, seed, split, index, views = task
    r = render_scene(fmt, seed, split, index, views=views)
    return {'pngs': [png_bytes(im) for im in r['rgb']], 'fxfycxcy': r['fxfycxcy'].tolist(),
            'w2c': r['w2c'].tolist()}


def write_lvsm(out_dir, num_scenes: int, seed: int = 0, *,
               split_sizes: dict[str, int] | None = None, views: tuple[int, int] | None = None,
               workers: int | None = None, progress: Callable[[int], None] | None = None
               ) -> WriteResult:
    """Write ``num_scenes`` clips as LVSM scenes to ``out_dir`` (see the module docstring)."""
    root = pathlib.Path(out_dir).absolute()
    sizes = resolve_splits('lvsm', num_scenes, split_sizes)
    tasks = [(*t, views) for t in tasks_of('lvsm', seed, sizes)]
    scenes = {s: [] for s in sizes}
    lists: dict[str, list[str]] = {s: [] for s in sizes}
    num_images = image_bytes = 0
    for (_, _, split, index, _), r in zip(tasks, render_all(_encode, tasks, workers, progress)):
        name = video_key(seed, split, index)
        images = root / split / 'images' / name
        images.mkdir(parents=True, exist_ok=True)
        frames = []
        for v, data in enumerate(r['pngs']):
            path = images / f'{v:05d}.png'
            path.write_bytes(data)
            frames.append({'image_path': str(path), 'fxfycxcy': r['fxfycxcy'][v],
                           'w2c': r['w2c'][v]})
            num_images += 1
            image_bytes += len(data)
        meta = root / split / 'metadata' / f'{name}.json'
        meta.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps({'scene_name': name, 'frames': frames}, indent=4))
        lists[split].append(str(meta))
        scenes[split].append(name)
    for split, paths in lists.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / split / 'full_list.txt').write_text(''.join(p + '\n' for p in sorted(paths)))
    write_marker(root, 'lvsm', seed, scenes)
    return WriteResult('lvsm', root, root, scenes, num_images, image_bytes)
