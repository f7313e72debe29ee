"""Shards -> LVSM scenes (LVSM's ``data/dataset_scene.py`` loads them unchanged).

Layout, as LVSM's ``process_data.py`` writes it (docs/EXPORT.md; consumer code cited in FORMATS
section 2): ``<out>/<split>/images/<key>/NNNNN.png`` (3-channel PNG: PNG views keep their bytes,
JPEG views are re-encoded losslessly from their decoded pixels, RGBA views lose alpha),
``<out>/<split>/metadata/<key>.json`` = ``{"scene_name": key, "frames": [{"image_path": absolute
path, "fxfycxcy": [fx, fy, cx, cy] pixels, "w2c": 4x4 OpenCV world-to-camera}]}`` and
``<out>/<split>/full_list.txt`` (the JSONs' absolute paths, sorted). LVSM opens both paths verbatim,
so they are absolute; sample keys never hold a '.' (LVSM's inference filter splits at the first).

Resumable and deterministic: a scene's JSON is written (atomically) after its images, so a scene
with a JSON is complete and a rerun skips it; ``full_list.txt`` is written last.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from pipeline.durable import atomic_write
from pipeline.export.common import (export_splits, json_text, prepare_output, progress_bar,
                                    split_samples, split_size, view_image)
from pipeline.export.conventions import lvsm_frame_camera
from pipeline.reader import Scene

LIST_FILE = 'full_list.txt'


def _export_scene(scene: Scene, folder: str, size: tuple[int, int] | None) -> str:
    images = os.path.join(folder, 'images', scene.key)
    os.makedirs(images, exist_ok=True)
    frames = []
    for v in range(scene.num_views):
        data, ext, K, _ = view_image(scene, v, size, png=True)
        path = os.path.join(images, f'{v:05d}.{ext}')
        atomic_write(path, data, 'LVSM image')
        fxfycxcy, w2c = lvsm_frame_camera(K, scene.c2w[v])
        frames.append({'image_path': path, 'fxfycxcy': fxfycxcy, 'w2c': w2c})
    meta = os.path.join(folder, 'metadata', f'{scene.key}.json')
    atomic_write(meta, json_text({'scene_name': scene.key, 'frames': frames}, indent=4),
                 'LVSM scene JSON')
    return meta


def export_lvsm(shards: str, out: str, splits: Sequence[str] | None = None,
                size: tuple[int, int] | None = None, progress: bool = True
                ) -> dict[str, dict[str, Any]]:
    """Export ``splits`` (default: all) of the shard directory ``shards`` as LVSM scenes in ``out``;
    returns {split: {'scenes', 'list'}}. ``size`` (h, w) resizes and centre-crops every view."""
    splits = export_splits(shards, list(splits) if splits else None)
    out = os.path.abspath(out)  # LVSM opens the paths verbatim: absolute ones
    prepare_output(out, 'lvsm', {'shards': os.path.abspath(shards), 'splits': splits,
                                 'size': list(size) if size else None})
    summary = {}
    for split in splits:
        folder = os.path.join(out, split)
        os.makedirs(os.path.join(folder, 'metadata'), exist_ok=True)
        listed = []
        with progress_bar(split_size(shards, split), f'lvsm {split}', progress) as bar:
            for sample in split_samples(shards, split):
                meta = os.path.join(folder, 'metadata', f'{sample["__key__"]}.json')
                if not os.path.isfile(meta):  # else done by an earlier run
                    meta = _export_scene(Scene(sample), folder, size)
                listed.append(meta)
                bar.update()
        atomic_write(os.path.join(folder, LIST_FILE), ''.join(f'{p}\n' for p in sorted(listed))
                     .encode(), LIST_FILE)
        summary[split] = {'scenes': len(listed), 'list': os.path.join(folder, LIST_FILE)}
    return summary
