"""RealEstate10K / ACID as pixelSplat stores them (its chunks: dcharatan/real_estate_10k_tools
``src/convert.py``): ``DIR/<stage>/NNNNNN.torch`` (``torch.save`` of a list of scene dicts ``key``
(16 hex digits), ``url``, ``timestamps`` int64 [V] (microseconds, 30 fps frames every 3rd),
``cameras`` float32 [V, 18] (fx/W, fy/H, cx/W, cy/H, 0, 0, world-to-camera 3x4 row-major, OpenCV),
``images`` (V 1-D uint8 tensors: JPEG file bytes)), ``DIR/<stage>/index.json`` (key -> chunk file
name) and ``DIR/evaluation_index_<name>.json`` for the test stage ({key: {"context": [a, b],
"target": [3 views between]}}, every 4th scene null, as pixelSplat's has nulls). Stages ``train`` and
``test`` (pixelSplat's). Scenes: hand-held video clips (``rigs.video_cameras``) of 8-14 JPEG frames
(quality 90) at 72x128, scene 1 of each stage at 60x80; ``scenes_per_chunk`` scenes per chunk.
Cameras are rendered from the stored float32 values (``common.scene_cameras``)."""
from __future__ import annotations

import hashlib
import io
import json
import pathlib
from typing import Callable

import numpy as np
from PIL import Image

from pipeline.synthetic.common import (WriteResult, render_all, render_scene, resolve_splits,
                                       tasks_of, write_marker)

JPEG_QUALITY = 90


def jpeg_bytes(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of a uint8 RGB image [h, w, 3] (Pillow, 4:2:0; deterministic)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format='JPEG', quality=quality)
    return buf.getvalue()


def video_key(seed: int, split: str, index: int) -> str:
    """A RealEstate10K-style scene key: 16 hex digits, deterministic."""
    return hashlib.sha256(f'{seed}/{split}/{index}'.encode()).hexdigest()[:16]


def _encode(task: tuple) -> dict:
    """Worker: render one clip and encode what a chunk stores (module level: picklable)."""
    fmt, seed, split, index, views = task
    r = render_scene(fmt, seed, split, index, views=views)
    rng = np.random.default_rng([seed, index, 10])
    t0 = int(rng.integers(10**7, 10**9))
    return {'jpegs': [jpeg_bytes(im) for im in r['rgb']], 'rows': r['rows'],
            'timestamps': [t0 + 100100 * i for i in range(len(r['rgb']))]}


def evaluation_entry(num_views: int, index: int) -> dict | None:
    """The evaluation index entry of scene ``index``: null for every 4th, else two context views
    and three sorted targets between them."""
    if index % 4 == 3 or num_views < 5:
        return None
    a, b = 0, num_views - 1 - index % 2
    return {'context': [a, b], 'target': sorted({a + 1, (a + b) // 2, b - 1})}


def write_re10k(out_dir, num_scenes: int, seed: int = 0, *, name: str = 're10k',
                split_sizes: dict[str, int] | None = None, scenes_per_chunk: int = 3,
                views: tuple[int, int] | None = None, workers: int | None = None,
                progress: Callable[[int], None] | None = None) -> WriteResult:
    """Write ``num_scenes`` clips as pixelSplat chunks to ``out_dir`` (see the module docstring);
    ``views``: range of frames per clip (default 8-14)."""
    import torch
    root = pathlib.Path(out_dir)
    sizes = resolve_splits('re10k', num_scenes, split_sizes)
    tasks = [(*t, views) for t in tasks_of('re10k', seed, sizes)]
    scenes = {s: [] for s in sizes}
    chunks: dict[str, list] = {s: [] for s in sizes}
    index_json: dict[str, dict[str, str]] = {s: {} for s in sizes}
    evaluation, num_images, image_bytes = {}, 0, 0

    def flush(split):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        name_ = f'{len(list(folder.glob("*.torch"))):0>6}.torch'
        torch.save(chunks[split], folder / name_)
        for entry in chunks[split]:
            index_json[split][entry['key']] = name_
        chunks[split] = []

    for (_, _, split, index, _), r in zip(tasks, render_all(_encode, tasks, workers, progress)):
        key = video_key(seed, split, index)
        chunks[split].append({
            'url': f'https://www.youtube.com/watch?v={key[:11]}',
            'timestamps': torch.tensor(r['timestamps'], dtype=torch.int64),
            'cameras': torch.from_numpy(r['rows']),
            'images': [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in r['jpegs']],
            'key': key})
        scenes[split].append(key)
        num_images += len(r['jpegs'])
        image_bytes += sum(len(j) for j in r['jpegs'])
        if split == 'test':
            evaluation[key] = evaluation_entry(len(r['jpegs']), index)
        if len(chunks[split]) == scenes_per_chunk:
            flush(split)
    for split in sizes:
        if chunks[split]:
            flush(split)
        if split in index_json and (root / split).is_dir():
            (root / split / 'index.json').write_text(json.dumps(index_json[split], indent=2))
    root.mkdir(parents=True, exist_ok=True)
    if evaluation:
        (root / f'evaluation_index_{name}.json').write_text(json.dumps(evaluation))
    write_marker(root, 're10k', seed, scenes)
    return WriteResult('re10k', root, root, scenes, num_images, image_bytes)
