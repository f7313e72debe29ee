"""LVSM scenes (Haian-Jin/LVSM ``data/dataset_scene.py``; written by its ``process_data.py``) source
reader.

Layout: ``<src>/<split>/full_list.txt`` (one scene JSON path per line, blank lines ignored, as
``dataset_scene.py:20-27`` reads it), ``<split>/metadata/<scene>.json`` =
``{"scene_name": str, "frames": [{"image_path": str, "fxfycxcy": [fx, fy, cx, cy] (pixels of that
image), "w2c": 4x4 world-to-camera, OpenCV axes}]}``, images (PNG; JPEG also accepted) wherever
``image_path`` says. Every folder of ``<src>`` with a ``full_list.txt`` is a split (or those of the
one sub-folder that has such folders, as process_data.py's ``center_crop_<n>/``; or ``<src>``
itself, a split named after it: train, val or test, else train).

Paths: LVSM opens list entries and ``image_path`` verbatim (``dataset_scene.py:62,153``), i.e.
relative to its working directory. Here a relative list entry is resolved against the list file's
folder; a relative ``image_path`` against the JSON's folder, then the list file's folder and its
parents (where LVSM's preprocessing ran). An absolute path that does not exist (a dataset moved
from the machine that wrote it) is looked up in LVSM's own layout: ``<split>/metadata/<file>`` and
``<split>/images/<scene folder>/<file>``. ``meta.json`` keeps the paths as listed.

Views keep the file order and the image bytes; K = [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] (LVSM's rays
use pixel centres at +0.5, ``utils/data_utils.py:67-77``: ours), c2w = inv(w2c); each view's size is
read from its header. Poses stay in the source's world and units (LVSM normalises them at load time).
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterator, Sequence

import numpy as np

from pipeline import cameras
from pipeline.schema import SourceError, SourceScene, image_info

LIST_FILE = 'full_list.txt'
SPLIT_NAMES = ('train', 'val', 'test')


class LVSMSource:
    """Reader of an LVSM scene directory (see the module docstring)."""
    fixed_members = False  # scenes differ in view count

    def __init__(self, root: str, dataset: str):
        self.root, self.dataset = os.path.abspath(str(root)), dataset
        if not os.path.isdir(self.root):
            raise SourceError(f'{self.root}: no such directory (LVSM scenes expected: '
                              f'<src>/<split>/{LIST_FILE})')
        self._lists = _split_lists(self.root)
        if not self._lists:  # process_data.py's own output folder: <out>/center_crop_<n>/<split>/
            inner = {d: _split_lists(os.path.join(self.root, d)) for d in sorted(os.listdir(self.root))
                     if os.path.isdir(os.path.join(self.root, d))}
            inner = {d: lists for d, lists in inner.items() if lists}
            if len(inner) > 1:
                raise SourceError(f'{self.root}: scene directories in {sorted(inner)}: pass one of '
                                  'them as --src')
            self._lists = next(iter(inner.values()), {})
        if not self._lists and os.path.isfile(os.path.join(self.root, LIST_FILE)):
            name = os.path.basename(self.root)
            self._lists = {name if name in SPLIT_NAMES else 'train':
                           os.path.join(self.root, LIST_FILE)}
        if not self._lists:
            raise SourceError(f'{self.root}: no <split>/{LIST_FILE} (is it an LVSM scene directory '
                              'as its process_data.py writes, e.g. re10k/ with train/ and test/?)')

    def splits(self) -> list[str]:
        return list(self._lists)

    def scene_refs(self, split: str) -> list[str]:
        """The list file's entries, verbatim, in its order (LVSM's order)."""
        path = self._lists[split]
        with open(path, encoding='utf-8') as f:
            return [line.strip() for line in f.read().splitlines() if line.strip()]

    def read(self, split: str, refs: Sequence[str], start_index: int
             ) -> Iterator[SourceScene | SourceError]:
        seen: dict[str, str] = {}
        for i, ref in enumerate(refs):
            try:
                scene = self._read_scene(split, ref, start_index + i)
                if scene.scene_id in seen:  # within this shard; across shards verify finds it
                    raise SourceError(f'{scene.origin}: scene {scene.scene_id} again (also in '
                                      f'{seen[scene.scene_id]})', scene_id=scene.scene_id,
                                      source_file=scene.origin)
                seen[scene.scene_id] = scene.origin
                yield scene
            except SourceError as e:
                yield e

    def _resolve(self, split: str, listed: str, bases: list[str], layout: list[str]) -> str | None:
        """The file a listed path names: absolute as is, relative against ``bases`` in order; if
        that does not exist, the same file name in LVSM's layout folders ``layout``."""
        if os.path.isabs(listed):
            candidates = [listed]
        else:
            candidates = [os.path.normpath(os.path.join(b, listed)) for b in bases]
        candidates += [os.path.join(folder, os.path.basename(listed)) for folder in layout]
        return next((c for c in candidates if os.path.isfile(c)), None)

    def _read_scene(self, split: str, ref: str, index: int) -> SourceScene:
        list_dir = os.path.dirname(self._lists[split])
        path = self._resolve(split, ref, [list_dir], [os.path.join(list_dir, 'metadata')])
        if path is None:
            raise SourceError(f'{self._lists[split]}: scene JSON {ref} not found',
                              scene_id=os.path.splitext(os.path.basename(ref))[0],
                              source_file=ref)
        try:
            with open(path, encoding='utf-8') as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise SourceError(f'{path}: unreadable scene JSON ({e})', source_file=path) from None
        name = data.get('scene_name') if isinstance(data, dict) else None
        name = name if isinstance(name, str) and name else os.path.splitext(os.path.basename(path))[0]

        def bad(message):
            return SourceError(f'{path}: scene {name}: {message}', scene_id=name, source_file=path)

        frames = data.get('frames') if isinstance(data, dict) else None
        if not isinstance(frames, list) or not frames:
            raise bad('no "frames" list')
        parents = [list_dir]
        while os.path.dirname(parents[-1]) != parents[-1]:
            parents.append(os.path.dirname(parents[-1]))
        images, Ks, poses, names, listed = [], [], [], [], []
        for v, frame in enumerate(frames):
            if not isinstance(frame, dict) or not isinstance(frame.get('image_path'), str):
                raise bad(f'frame {v} has no "image_path"')
            image_path = frame['image_path']
            folder = os.path.basename(os.path.dirname(image_path))
            file = self._resolve(split, image_path, [os.path.dirname(path)] + parents,
                                 [os.path.join(list_dir, 'images', folder),
                                  os.path.join(list_dir, 'images', name)])
            if file is None:
                raise bad(f'frame {v}: missing image {image_path}')
            K, pose = _camera(frame, f'frame {v}', bad)
            with open(file, 'rb') as f:
                raw = f.read()
            try:
                image_info(raw, f'{path}: scene {name} frame {v} ({file})')
            except SourceError as e:
                raise SourceError(str(e), scene_id=name, source_file=path) from None
            images.append(raw)
            Ks.append(K)
            poses.append(pose)
            names.append(os.path.splitext(os.path.basename(image_path))[0])
            listed.append(image_path)
        return SourceScene(
            dataset=self.dataset, split=split, scene_id=name, reference_index=index,
            view_names=names, images=images, K=np.stack(Ks), c2w=np.stack(poses),
            source_meta={'scene_name': name, 'json': ref, 'image_paths': listed},
            origin=path, source_format='lvsm_scenes',
            source_camera_convention='per frame: fxfycxcy [fx, fy, cx, cy] in pixels of the image '
                                     'file, w2c 4x4 world-to-camera with OpenCV axes',
            camera_conversion='K = [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]; c2w = inv(w2c)',
            world_frame="the source's world frame and units, unchanged (LVSM re-centres and "
                        're-scales the poses at load time)')

    def describe(self) -> dict[str, Any]:
        return {'dataset': self.dataset, 'format': f'LVSM scenes (<split>/{LIST_FILE})',
                'path': self.root, 'splits': self.splits(),
                'url': 'https://github.com/Haian-Jin/LVSM'}


def _split_lists(folder: str) -> dict[str, str]:
    """{split: its list file} of the sub-folders of ``folder`` that hold a full_list.txt."""
    return {d: os.path.join(folder, d, LIST_FILE) for d in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, d, LIST_FILE))}


def _camera(frame: dict, view: str, bad) -> tuple[np.ndarray, np.ndarray]:
    """(K [3, 3], c2w [4, 4]) of one LVSM frame, checked."""
    try:
        fx, fy, cx, cy = (float(x) for x in frame['fxfycxcy'])
        w2c = np.asarray(frame['w2c'], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as e:
        raise bad(f'{view}: "fxfycxcy" must be 4 numbers and "w2c" a 4x4 matrix ({e})') from None
    K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
    if w2c.shape != (4, 4):
        raise bad(f'{view}: "w2c" must be 4x4 (LVSM inverts it), got {list(w2c.shape)}')
    if not (np.isfinite(K).all() and np.isfinite(w2c).all()):
        raise bad(f'{view}: non-finite camera (fxfycxcy {[fx, fy, cx, cy]}, w2c {w2c.tolist()})')
    try:
        cameras.check_pose(w2c, 'w2c')
        cameras.check_intrinsics(K)
    except ValueError as e:
        raise bad(f'{view}: bad camera: {e}') from None
    # The flip: LVSM stores world-to-camera; ours is camera-to-world (dataset_scene.py:92-94).
    return K, np.linalg.inv(w2c)
