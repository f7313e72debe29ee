"""NMR (DVR's multi-class ShapeNet renders) source reader.

Layout: ``metadata.yaml`` (class entries with ``id``), ``<class>/softras_<split>.lst`` (scene names,
one per line), ``<class>/<scene>/image/0000.png ...`` and ``<class>/<scene>/cameras.npz`` with
``world_mat_i``, ``camera_mat_i``, ``world_mat_inv_i``, ``camera_mat_inv_i`` per view i. Cameras are
converted with ``pipeline.cameras.nmr_to_opencv`` (into the reference's rotated, z-up world).
"""
from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

import numpy as np
import yaml

from pipeline import cameras
from pipeline.schema import SourceError, SourceScene
from pipeline.sources import read_each, read_view_png

SPLITS = ('train', 'val', 'test')


class NMRSource:
    dataset = 'nmr'

    def __init__(self, root: str):
        self.root = str(root)
        meta_path = os.path.join(self.root, 'metadata.yaml')
        if not os.path.isfile(meta_path):
            raise SourceError(f'{meta_path}: missing (is {self.root} an NMR dataset directory?)')
        with open(meta_path) as f:
            # BaseLoader keeps every scalar a string: class ids such as 04256520 would otherwise
            # parse as octal integers.
            metadata = yaml.load(f, Loader=yaml.BaseLoader)
        # The reference keeps the YAML's order of classes.
        self.class_ids = [entry['id'] for entry in metadata.values()]

    def splits(self) -> list[str]:
        return [s for s in SPLITS if any(os.path.isfile(self._list_path(c, s)) for c in self.class_ids)]

    def _list_path(self, class_id: str, split: str) -> str:
        return os.path.join(self.root, class_id, f'softras_{split}.lst')

    def scene_refs(self, split: str) -> list[str]:
        refs = []
        for class_id in self.class_ids:
            path = self._list_path(class_id, split)
            if not os.path.isfile(path):
                raise SourceError(f'{path}: missing scene list for split {split!r}')
            with open(path) as f:
                # As the reference: lines of length <= 1 (a bare newline) are not scenes.
                refs += [f'{class_id}/{line.rstrip()}' for line in f if len(line) > 1]
        return refs

    def read(self, split: str, refs: Sequence[str], start_index: int
             ) -> Iterator[SourceScene | SourceError]:
        return read_each(self._read_scene, split, refs, start_index)

    def _read_scene(self, split: str, ref: str, index: int) -> SourceScene:
        scene_dir = os.path.join(self.root, ref)
        cam_path = os.path.join(scene_dir, 'cameras.npz')
        if not os.path.isfile(cam_path):
            raise SourceError(f'{cam_path}: missing cameras.npz (scene {ref})')
        try:
            with np.load(cam_path, allow_pickle=False) as npz:
                mats = {k: npz[k] for k in npz.files}
        except Exception as e:  # zip/npy errors of a corrupt file
            raise SourceError(f'{cam_path}: unreadable cameras.npz (scene {ref}): {e}') from None
        num_views = sum(1 for k in mats if k.startswith('world_mat_inv_'))
        images, Ks, poses, names = [], [], [], []
        for v in range(num_views):
            path = os.path.join(scene_dir, 'image', f'{v:04d}.png')
            data, width, height = read_view_png(path, v, ref)
            try:
                K, pose = cameras.nmr_to_opencv(mats[f'world_mat_inv_{v}'], mats[f'camera_mat_inv_{v}'],
                                                height, width)
            except (KeyError, ValueError) as e:
                raise SourceError(f'{cam_path}: bad camera for view {v} (scene {ref}): {e}') from None
            images.append(data)
            Ks.append(K)
            poses.append(pose)
            names.append(f'{v:04d}')
        class_id, scene_name = ref.split('/', 1)
        return SourceScene(
            dataset=self.dataset, split=split, scene_id=ref, reference_index=index,
            view_names=names, images=images, K=np.stack(Ks), c2w=np.stack(poses),
            source_meta={'class_id': class_id, 'scene_name': scene_name,
                         'world_rotation': cameras.NMR_WORLD_ROTATION.tolist(),
                         'note': 'c2w is in the reference rotated world: '
                                 'world = world_rotation @ DVR world (z up)'},
            origin=scene_dir)

    def describe(self) -> dict[str, Any]:
        return {'dataset': 'nmr', 'format': 'NMR (DVR multi-class ShapeNet renders)',
                'path': self.root, 'classes': self.class_ids}
