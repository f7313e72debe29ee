"""ObSuRF source reader: CLEVR3D (``clevr3d``) and ObSuRF's MultiShapeNet (``obsurf_msn``).

Layout: ``metadata.npz`` with per-scene arrays (leading dimension = scene index; ``shape`` marks
present objects with a nonzero class, ``camera_pos`` [scenes, views, 3]) and
``images/img_<scene>_<view>.png`` (RGBA). Splits are fixed scene-index ranges, and scenes with more
than ``max_objects`` objects are dropped, exactly as the reference loader does (so a small generated
set places its scenes at the start of each range and marks unused rows as full).

Where the source has a ``masks/`` directory (ObSuRF's downloads do; OSRT reads it), each view's
``masks/masks_<scene>_<view>.png`` (instance ids, 0 the background; stelzner/osrt
``osrt/data/obsurf.py:91-94``) is carried unchanged as the view's ``instance`` extra; a view without
its mask is then an error naming the file.
"""
from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

import numpy as np

from pipeline import cameras
from pipeline.schema import SourceError, SourceScene
from pipeline.sources import read_each, read_view_png

SPLIT_RANGES = {
    'clevr3d': {'train': (0, 70000), 'val': (70000, 75000), 'test': (85000, 100000)},
    'obsurf_msn': {'train': (0, 80000), 'val': (80000, 80500), 'test': (90000, 100000)},
}
DEFAULT_MAX_OBJECTS = 6  # the reference loader's default


class ObsurfSource:
    def __init__(self, root: str, dataset: str = 'clevr3d',
                 max_objects: int | None = DEFAULT_MAX_OBJECTS):
        if dataset not in SPLIT_RANGES:
            raise ValueError(f'ObSuRF dataset must be clevr3d or obsurf_msn, got {dataset!r}')
        self.root, self.dataset, self.max_objects = str(root), dataset, max_objects
        path = os.path.join(self.root, 'metadata.npz')
        if not os.path.isfile(path):
            raise SourceError(f'{path}: missing (is {self.root} an ObSuRF dataset directory?)')
        try:
            with np.load(path, allow_pickle=False) as npz:
                self.metadata = {k: npz[k] for k in npz.files}
        except Exception as e:
            raise SourceError(f'{path}: unreadable metadata.npz: {e}') from None
        for k in ('shape', 'camera_pos'):
            if k not in self.metadata:
                raise SourceError(f'{path}: metadata.npz has no {k!r} array')
        self.num_objects = (self.metadata['shape'] > 0).sum(axis=1)
        self.has_masks = os.path.isdir(os.path.join(self.root, 'masks'))

    def splits(self) -> list[str]:
        n = len(self.metadata['shape'])
        return [s for s, (lo, _) in SPLIT_RANGES[self.dataset].items() if lo < n]

    def scene_refs(self, split: str) -> list[int]:
        lo, hi = SPLIT_RANGES[self.dataset][split]
        idx = np.arange(lo, min(hi, len(self.num_objects)))
        if self.max_objects is not None:
            idx = idx[self.num_objects[idx] <= self.max_objects]
        return [int(i) for i in idx]

    def num_filtered(self, split: str) -> int:
        """Scenes of the split range that the max_objects filter drops."""
        lo, hi = SPLIT_RANGES[self.dataset][split]
        return max(0, min(hi, len(self.num_objects)) - lo) - len(self.scene_refs(split))

    def read(self, split: str, refs: Sequence[int], start_index: int
             ) -> Iterator[SourceScene | SourceError]:
        return read_each(self._read_scene, split, refs, start_index)

    def _read_scene(self, split: str, scene: int, index: int) -> SourceScene:
        positions = self.metadata['camera_pos'][scene]
        images, Ks, poses, masks = [], [], [], []
        for v in range(len(positions)):
            path = os.path.join(self.root, 'images', f'img_{scene}_{v}.png')
            data, width, height = read_view_png(path, v, scene)
            if self.has_masks:
                mask_path = os.path.join(self.root, 'masks', f'masks_{scene}_{v}.png')
                masks.append(read_view_png(mask_path, v, scene)[0])
            try:
                K, pose = cameras.obsurf_to_opencv(positions[v], height, width)
            except ValueError as e:
                raise SourceError(f'{self.root}/metadata.npz: bad camera_pos for scene {scene} '
                                  f'view {v}: {e}') from None
            images.append(data)
            Ks.append(K)
            poses.append(pose)
        fields = {k: v[scene].tolist() for k, v in sorted(self.metadata.items())}
        return SourceScene(
            dataset=self.dataset, split=split, scene_id=scene, reference_index=index,
            view_names=[str(v) for v in range(len(images))], images=images, K=np.stack(Ks),
            c2w=np.stack(poses), extras={'instance': masks} if self.has_masks else {},
            source_meta={'num_objects': int(self.num_objects[scene]), 'metadata': fields},
            origin=os.path.join(self.root, 'images', f'img_{scene}_*.png'))

    def describe(self) -> dict[str, Any]:
        return {'dataset': self.dataset, 'format': 'ObSuRF (metadata.npz + images/)',
                'path': self.root, 'max_objects': self.max_objects, 'masks': self.has_masks,
                'split_ranges': SPLIT_RANGES[self.dataset]}
