"""pixelSplat chunks (RE10K, ACID, DL3DV chunks of MVSplat / DepthSplat) source reader.

Layout, as pixelSplat reads it (dcharatan/pixelsplat ``src/dataset/dataset_re10k.py:56-63``;
written by dcharatan/real_estate_10k_tools ``src/convert.py``): ``<src>/<stage>/NNNNNN.torch``, each a
``torch.save`` of a list of dicts ``key`` (str), ``url`` (str), ``timestamps`` (int64 [V]),
``cameras`` (float [V, 18]: fx/W, fy/H, cx/W, cy/H, 0, 0, then the world-to-camera 3x4 row-major,
OpenCV axes), ``images`` (list of V 1-D uint8 tensors, each an image file's bytes, JPEG for RE10K);
``<src>/<stage>/index.json`` maps keys to chunk file names. Stages are ``train`` and ``test``
(pixelSplat's ``val`` reads ``test``); every folder of ``<src>`` holding ``*.torch`` files is a split.

As pixelSplat does, the chunks of a split are its ``*.torch`` files in sorted order (``index.json`` is
not how pixelSplat finds them); scenes keep the chunks' order. ``index.json`` is cross-checked, never
trusted alone: a key it lists that no chunk holds (e.g. a missing chunk file) is a bad scene (named
error, or a ``--skip-bad`` record), and each scene's ``meta.json`` records the chunk index.json names.

Chunks are loaded with ``torch.load(..., weights_only=True)`` (memory-mapped where the file allows):
a chunk holding anything but tensors, strings, numbers, None, lists, tuples and dicts is refused,
never unpickled. Each view keeps its image bytes unchanged; its intrinsics are turned into pixels
with its own size, read from the image header (no decode): K = diag(W, H, 1) @ K_norm, so views of
any size convert. Poses stay in the source's world and units. The evaluation index
(``--evaluation-index`` or ``evaluation_index_<dataset>.json`` in ``<src>`` or ``<src>/assets``) is
carried as ``<split>.evaluation_index.json`` keyed by sample keys.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterator, Sequence

import numpy as np

from pipeline import cameras
from pipeline.schema import SourceError, SourceScene, image_info, json_bytes, scene_key

CONVENTION = ('cameras [V, 18]: fx/W, fy/H, cx/W, cy/H (normalised by each image\'s own W, H), '
              '2 unused, world-to-camera 3x4 row-major with OpenCV axes')
CONVERSION = 'K = diag(W, H, 1) @ K_norm per view (W, H from the image header); c2w = inv(w2c)'


def load_chunk(path: str) -> list[dict[str, Any]]:
    """A chunk's list of scene dicts, loaded with ``weights_only=True`` (memory-mapped when the file
    is in torch's zip format) and checked to hold only tensors, strings, numbers, None, lists,
    tuples and dicts (what weights_only loading gives): anything else is refused with a
    SourceError naming the chunk, never unpickled."""
    import torch
    try:
        try:
            chunk = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        except RuntimeError as e:
            if 'mmap' not in str(e):
                raise
            chunk = torch.load(path, map_location='cpu', weights_only=True)  # legacy format
    except Exception as e:
        text = str(e)
        lines = [ln.strip() for ln in text.splitlines() if 'GLOBAL' in ln or 'nsupported' in ln]
        reason = lines[0] if lines else f'{type(e).__name__}: {text.splitlines()[0] if text else ""}'
        if 'Weights only load failed' in text:
            raise SourceError(f'{path}: refused: the chunk holds an object other than tensors, '
                              f'strings, numbers, lists and dicts, which is never unpickled '
                              f'({reason})', source_file=path) from None
        raise SourceError(f'{path}: unreadable chunk ({reason})', source_file=path) from None
    if not isinstance(chunk, list):
        raise SourceError(f'{path}: a chunk must hold a list of scene dicts, not a '
                          f'{type(chunk).__name__}', source_file=path)
    _check_types(chunk, path, 'chunk')
    return chunk


def _check_types(obj, path: str, where: str) -> None:
    import torch
    # What weights_only loading can give besides containers: the fields pixelSplat ignores (url,
    # fps, ...) may hold any of these, so they pass; the fields it reads are checked per scene.
    if obj is None or isinstance(obj, (torch.Tensor, str, bool, int, float)):
        return
    if isinstance(obj, (list, tuple)):
        for i, x in enumerate(obj):
            _check_types(x, path, f'{where}[{i}]')
    elif isinstance(obj, dict):
        for k, x in obj.items():
            if not isinstance(k, str):
                raise SourceError(f'{path}: {where} has a non-string key {k!r}', source_file=path)
            _check_types(x, path, f'{where}[{k!r}]')
    else:
        raise SourceError(f'{path}: refused: {where} is a {type(obj).__name__}, not a tensor, '
                          'string, number, None, list, tuple or dict', source_file=path)


def scene_from_dict(entry: dict, dataset: str, split: str, index: int, where: str,
                    chunk_file: str) -> SourceScene:
    """One chunk entry -> SourceScene, every field checked (SourceError naming ``where``, the
    scene key and the view)."""
    import torch
    key = entry.get('key')
    if isinstance(key, torch.Tensor) and key.numel() == 1:  # as LVSM's process_data.py reads it
        key = str(key.item())
    if not isinstance(key, str) or not key:
        raise SourceError(f'{where}: scene without a string "key"', source_file=chunk_file)
    where = f'{where}: scene {key}'

    def bad(message):
        return SourceError(f'{where}: {message}', scene_id=key, source_file=chunk_file)

    cams, images = entry.get('cameras'), entry.get('images')
    if not isinstance(cams, torch.Tensor) or not cams.is_floating_point() or cams.ndim != 2 \
            or cams.shape[1] != 18:
        raise bad(f'"cameras" must be a float tensor [V, 18], got '
                  f'{getattr(cams, "dtype", type(cams).__name__)} {list(getattr(cams, "shape", []))}')
    V = cams.shape[0]
    if not isinstance(images, (list, tuple)) or len(images) != V:  # pixelSplat only indexes it
        raise bad(f'"images" must be a list of {V} uint8 tensors (one per camera), got '
                  f'{len(images) if isinstance(images, (list, tuple)) else type(images).__name__}')
    timestamps = entry.get('timestamps')
    if isinstance(timestamps, (list, tuple)) and all(type(t) is int for t in timestamps):
        timestamps = torch.tensor(timestamps, dtype=torch.int64)  # pixelSplat never reads them
    if timestamps is not None:
        if not isinstance(timestamps, torch.Tensor) or timestamps.is_floating_point() or \
                tuple(timestamps.shape) != (V,):
            raise bad(f'"timestamps" must be [{V}] integers, got '
                      f'{getattr(timestamps, "dtype", type(timestamps).__name__)} '
                      f'{list(getattr(timestamps, "shape", []))}')
        timestamps = [int(t) for t in timestamps.tolist()]
    names = [str(t) for t in timestamps] if timestamps is not None else [str(v) for v in range(V)]
    rows = cams.to(torch.float64).numpy()
    data, Ks, poses = [], [], []
    for v, img in enumerate(images):
        view = f'view {v} ({names[v]})'
        if not isinstance(img, torch.Tensor) or img.dtype != torch.uint8 or img.ndim != 1:
            raise bad(f'{view}: an image must be a 1-D uint8 tensor of the file\'s bytes, got '
                      f'{getattr(img, "dtype", type(img).__name__)} {list(getattr(img, "shape", []))}')
        raw = img.numpy().tobytes()
        try:
            width, height, _, _ = image_info(raw, f'{where} {view}')
        except SourceError as e:
            raise SourceError(str(e), scene_id=key, source_file=chunk_file) from None
        r = rows[v]
        if not np.isfinite(r).all():
            raise bad(f'{view}: non-finite camera row {r.tolist()}')
        # Normalised intrinsics -> pixels, with this view's own size (pixel centres agree: the
        # consumer's pixel (i, j) sits at ((j + 0.5) / W, (i + 0.5) / H), projection.py:117-137).
        Ks.append(np.array([[r[0] * width, 0.0, r[2] * width], [0.0, r[1] * height, r[3] * height],
                            [0.0, 0.0, 1.0]]))
        w2c = np.eye(4)
        w2c[:3] = r[6:].reshape(3, 4)
        try:
            cameras.check_pose(w2c, 'w2c')
        except ValueError as e:
            raise bad(f'{view}: the stored world-to-camera matrix is not a rigid transform: {e}')
        # The flip: the chunk stores world-to-camera; ours is camera-to-world (pixelSplat's loader
        # inverts it the same way, dataset_re10k.py:198-200).
        poses.append(np.linalg.inv(w2c))
        data.append(raw)
    url = entry.get('url')
    other = sorted(k for k in entry if k not in ('key', 'url', 'timestamps', 'cameras', 'images'))
    return SourceScene(
        dataset=dataset, split=split, scene_id=key, reference_index=index, view_names=names,
        images=data, K=np.stack(Ks), c2w=np.stack(poses), timestamps=timestamps,
        source_meta={'key': key, 'url': url if isinstance(url, str) else None,
                     'chunk': chunk_file, **({'other_fields': other} if other else {})},
        origin=where.rsplit(': scene ', 1)[0], source_format='pixelsplat_chunks',
        source_camera_convention=CONVENTION, camera_conversion=CONVERSION,
        world_frame="the source's world frame and units (RE10K, ACID: each video's SfM world, "
                    'arbitrary scale), unchanged')


class PixelSplatSource:
    """Reader of a pixelSplat chunk directory (see the module docstring)."""
    fixed_members = False  # scenes differ in view count

    def __init__(self, root: str, dataset: str, evaluation_index: str | None = None):
        self.root, self.dataset = str(root), dataset
        if not os.path.isdir(self.root):
            raise SourceError(f'{self.root}: no such directory (pixelSplat chunks expected: '
                              '<src>/<split>/NNNNNN.torch)')
        self._split_names = sorted(d for d in os.listdir(self.root) if self._chunks_of(d))
        if not self._split_names:
            raise SourceError(f'{self.root}: no <split>/*.torch chunk files (is it a pixelSplat '
                              'dataset root, e.g. re10k/ with train/ and test/?)')
        self.evaluation_index_path = evaluation_index or self._find_evaluation_index()
        self.evaluation_index = (read_evaluation_index(self.evaluation_index_path)
                                 if self.evaluation_index_path else None)
        self._refs: dict[str, list[dict]] = {}
        self._cache: tuple[str, list] | None = None  # the last chunk loaded

    def _chunks_of(self, split: str) -> list[str]:
        folder = os.path.join(self.root, split)
        if not os.path.isdir(folder):
            return []
        return sorted(f for f in os.listdir(folder) if f.endswith('.torch')
                      and os.path.isfile(os.path.join(folder, f)))

    def _find_evaluation_index(self) -> str | None:
        names = [f'evaluation_index_{self.dataset}.json']
        for folder in (self.root, os.path.join(self.root, 'assets')):
            for name in names:
                if os.path.isfile(os.path.join(folder, name)):
                    return os.path.join(folder, name)
        # Another dataset name (the directory is named otherwise): the one candidate there is.
        found = [os.path.join(folder, f) for folder in (self.root, os.path.join(self.root, 'assets'))
                 if os.path.isdir(folder) for f in sorted(os.listdir(folder))
                 if f.startswith('evaluation_index_') and f.endswith('.json') and '_video' not in f]
        return found[0] if len(found) == 1 else None

    def splits(self) -> list[str]:
        return list(self._split_names)

    def scene_refs(self, split: str) -> list[dict[str, Any]]:
        """One ref per scene in pixelSplat's order (sorted chunks, then chunk order), then one per
        chunk that could not be read and per index.json key that no chunk holds (these are read as
        the SourceError that names them)."""
        if split in self._refs:
            return self._refs[split]
        index = self._index_json(split)
        refs, seen, unread = [], {}, set()
        for chunk in self._chunks_of(split):
            try:
                entries = self._load(split, chunk)
            except SourceError as e:
                refs.append({'chunk': chunk, 'error': str(e)})
                unread.add(chunk)
                continue
            for i, entry in enumerate(entries):
                key = entry.get('key') if isinstance(entry, dict) else None
                ref = {'chunk': chunk, 'item': i, 'key': key if isinstance(key, str) else None}
                if ref['key'] is not None and ref['key'] in seen:
                    ref['error'] = f'duplicate scene key {key!r} (also in chunk {seen[key]})'
                elif ref['key'] is not None:
                    seen[key] = chunk
                    ref['index_json'] = index.get(key) if index is not None else None
                refs.append(ref)
        for key, value in sorted((index or {}).items()):
            if key not in seen:
                why = 'which could not be read' if value in unread else \
                    f'but no chunk of {split}/ holds it'
                refs.append({'chunk': value, 'key': key, 'error': f'index.json lists scene {key} in '
                             f'chunk {value}, {why}'})
        self._refs[split] = refs
        return refs

    def _index_json(self, split: str) -> dict[str, str] | None:
        path = os.path.join(self.root, split, 'index.json')
        if not os.path.isfile(path):
            return None
        try:
            with open(path) as f:
                index = json.load(f)
        except (OSError, ValueError) as e:
            raise SourceError(f'{path}: unreadable index.json ({e})', source_file=path) from None
        if not isinstance(index, dict) or not all(isinstance(v, str) for v in index.values()):
            raise SourceError(f'{path}: index.json must map scene keys to chunk file names',
                              source_file=path)
        return index

    def _load(self, split: str, chunk: str) -> list:
        path = os.path.join(self.root, split, chunk)
        if self._cache is None or self._cache[0] != path:
            self._cache = None
            self._cache = (path, load_chunk(path))
        return self._cache[1]

    def read(self, split: str, refs: Sequence[dict], start_index: int
             ) -> Iterator[SourceScene | SourceError]:
        for i, ref in enumerate(refs):
            path = os.path.join(self.root, split, ref['chunk'])
            chunk_file = f'{split}/{ref["chunk"]}'  # the skipped-scene log's source_file
            try:
                if 'error' in ref:
                    raise SourceError(ref['error'] if ref['error'].startswith(path) else
                                      f'{path}: {ref["error"]}', scene_id=ref.get('key'),
                                      source_file=chunk_file)
                entry = self._load(split, ref['chunk'])[ref['item']]
                if not isinstance(entry, dict):
                    raise SourceError(f'{path}: item {ref["item"]} is a {type(entry).__name__}, '
                                      'not a scene dict', source_file=chunk_file)
                scene = scene_from_dict(entry, self.dataset, split, start_index + i, path,
                                        chunk_file)
                listed = ref.get('index_json')
                scene.source_meta['index_json_chunk'] = listed
                yield scene
            except SourceError as e:
                yield e

    def split_files(self, split: str, keys: list[str]) -> dict[str, bytes]:
        """``<split>.evaluation_index.json``: the evaluation index's entries (null ones too) of the
        converted scenes of ``split``, keyed by their sample keys; nothing if none is listed."""
        if self.evaluation_index is None:
            return {}
        ours = {scene_key(self.dataset, split, r['key']): r['key'] for r in self.scene_refs(split)
                if r.get('key') is not None and 'error' not in r}
        out = {k: self.evaluation_index[ours[k]] for k in keys
               if k in ours and ours[k] in self.evaluation_index}
        if not out:
            return {}
        return {f'{split}.evaluation_index.json': json.dumps(out, indent=1, sort_keys=True).encode()
                + b'\n'}

    def describe(self) -> dict[str, Any]:
        out = {'dataset': self.dataset, 'format': 'pixelSplat chunks (<split>/NNNNNN.torch)',
               'path': self.root, 'splits': self.splits(),
               'url': 'https://github.com/dcharatan/pixelsplat'}
        if self.evaluation_index_path:
            with open(self.evaluation_index_path, 'rb') as f:
                out['evaluation_index'] = {'file': os.path.basename(self.evaluation_index_path),
                                           'sha256': hashlib.sha256(f.read()).hexdigest()}
        return out


def read_evaluation_index(path: str) -> dict[str, dict | None]:
    """pixelSplat's evaluation index ``{key: {"context": [int, ...], "target": [int, ...]} |
    null}`` (evaluation_index_generator.py:153-158), checked; SourceError naming the file and key."""
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise SourceError(f'{path}: unreadable evaluation index ({e})', source_file=path) from None
    if not isinstance(index, dict):
        raise SourceError(f'{path}: an evaluation index maps scene keys to entries',
                          source_file=path)
    for key, entry in index.items():
        if entry is None:
            continue
        if not isinstance(entry, dict) or not all(
                isinstance(entry.get(k), list) and all(isinstance(i, int) for i in entry[k])
                for k in ('context', 'target')):
            raise SourceError(f'{path}: scene {key}: an entry must be null or {{"context": [int, '
                              f'...], "target": [int, ...]}}, got {json_bytes(entry)[:80]!r}',
                              source_file=path)
    return index
