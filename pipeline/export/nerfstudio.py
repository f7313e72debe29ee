"""Shards -> nerfstudio captures: one folder per scene, ready for ``ns-train`` / gsplat.

``<out>/<key>/transforms.json`` + ``<out>/<key>/images/frame_NNNNN.<png|jpg>`` (the stored bytes,
unchanged; zero-padded names sort in view order, as nerfstudio orders frames by file name,
``nerfstudio_dataparser.py:124-131``). ``transforms.json`` (FORMATS section 3): ``camera_model``
(``PINHOLE``, or the source's model with its coefficients when the source recorded distortion),
``fl_x, fl_y, cx, cy, w, h`` at the top level when every view shares them, else in every frame
(nerfstudio accepts either, ``:104-109,137-154``); ``frames[{file_path, transform_matrix}]`` with
``transform_matrix`` the camera-to-world with OpenGL camera axes (``conventions.opengl_c2w``), in the
shards' world and units (nerfstudio re-centres and re-scales at load time). Also
``srt_shards_key`` (the sample key; nerfstudio ignores unknown keys).

Resumable: ``transforms.json`` is written last (atomically), so a folder with one is complete and a
rerun skips it.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from pipeline.durable import atomic_write
from pipeline.export.common import (ExportError, export_splits, json_text, prepare_output,
                                    progress_bar, split_samples, split_size)
from pipeline.export.conventions import opengl_c2w
from pipeline.reader import Scene
from pipeline.schema import IMAGE_EXTS

TRANSFORMS = 'transforms.json'
_INTRINSICS = ('fl_x', 'fl_y', 'cx', 'cy', 'w', 'h')
_COEFFS = ('k1', 'k2', 'k3', 'k4', 'p1', 'p2')


def transforms(scene: Scene, names: list[str]) -> dict[str, Any]:
    """The ``transforms.json`` dict of ``scene`` whose view ``v`` is stored as ``names[v]``."""
    frames, cams = [], []
    for v in range(scene.num_views):
        K, (h, w) = scene.K[v], scene.image_size(v)
        cams.append({'fl_x': float(K[0, 0]), 'fl_y': float(K[1, 1]), 'cx': float(K[0, 2]),
                     'cy': float(K[1, 2]), 'w': int(w), 'h': int(h)})
        frames.append({'file_path': f'images/{names[v]}',
                       'transform_matrix': opengl_c2w(scene.c2w[v]).tolist()})
    out: dict[str, Any] = {'camera_model': 'PINHOLE', 'srt_shards_key': scene.key}
    if all(c == cams[0] for c in cams):
        out.update(cams[0])
    else:  # views differ: nerfstudio then wants every intrinsic in every frame
        for frame, c in zip(frames, cams):
            frame.update(c)
    distortion = scene.meta.get('distortion')
    if distortion:
        out['camera_model'] = distortion.get('model') or 'OPENCV'
        coeffs = distortion.get('coeffs') or {}
        for name in _COEFFS:
            value = coeffs.get(name)
            if isinstance(value, list):  # per view
                if len(value) != scene.num_views:
                    raise ExportError(f'{scene.where}: distortion {name} has {len(value)} values '
                                      f'for {scene.num_views} views')
                for frame, x in zip(frames, value):
                    frame[name] = float(x)
            elif value is not None:
                out[name] = float(value)
    out['frames'] = frames
    return out


def export_nerfstudio(shards: str, out: str, splits: Sequence[str] | None = None,
                      scenes: Sequence[str] | None = None, progress: bool = True
                      ) -> dict[str, int]:
    """Export the scenes of ``splits`` (default: all; only the sample keys ``scenes`` if given) of
    the shard directory ``shards`` as nerfstudio folders in ``out``; returns {split: scenes}.
    ExportError naming any of ``scenes`` that no exported split holds."""
    splits = export_splits(shards, list(splits) if splits else None)
    wanted = set(scenes) if scenes else None
    prepare_output(out, 'nerfstudio', {'shards': os.path.abspath(shards), 'splits': splits})
    summary, found = {}, set()
    for split in splits:
        total = split_size(shards, split) if wanted is None else None
        with progress_bar(total, f'nerfstudio {split}', progress) as bar:
            summary[split] = 0
            for sample in split_samples(shards, split):
                key = sample['__key__']
                if wanted is not None and key not in wanted:
                    continue
                found.add(key)
                folder = os.path.join(out, key)
                if not os.path.isfile(os.path.join(folder, TRANSFORMS)):
                    _export_scene(Scene(sample), folder)
                summary[split] += 1
                bar.update()
    if wanted is not None and wanted - found:
        raise ExportError(f'{shards}: no scene {sorted(wanted - found)} in splits {splits} '
                          '(--scenes takes sample keys, e.g. from srt-shards inspect)')
    return summary


def _export_scene(scene: Scene, folder: str) -> None:
    os.makedirs(os.path.join(folder, 'images'), exist_ok=True)
    ext = IMAGE_EXTS[scene.image_format]
    names = [f'frame_{v:05d}.{ext}' for v in range(scene.num_views)]
    for v, name in enumerate(names):
        atomic_write(os.path.join(folder, 'images', name), scene.image_bytes(v), 'image')
    atomic_write(os.path.join(folder, TRANSFORMS), json_text(transforms(scene, names), indent=1),
                 TRANSFORMS)
