"""CO3D v2 source reader (facebookresearch/co3d, read as PyTorch3D's implicitron reads it).

Layout (co3d README): ``<root>/<category>/{frame_annotations.jgz, sequence_annotations.jgz,
set_lists/set_lists_<subset>.json, <sequence>/{images,masks,depths,depth_masks}/...}``; every path in
the annotations is relative to ``<root>``. ``--src`` is the dataset root (all its categories) or one
category folder.

Splits come from ONE subset's set lists (``subset``; PyTorch3D has no default: without ``subset``
the only subset present is used, else the first of ``DEFAULT_SUBSETS`` (fewview_dev first) that
every category has, else an error listing the choices; with no set lists at all every sequence goes
to split 'train' whole). Set lists
list FRAMES ``[sequence_name, frame_number, image_path]`` per split, matched on (sequence_name,
frame_number) with the path checked, as PyTorch3D does. One sample per (split, sequence) holding
exactly the frames the set list puts in that split, as PyTorch3D's dataset of that split holds
them: a sequence whose frames are in several splits (the many-view subsets put one sequence's
frames in train and test) gives one sample in each, and ``meta.json`` ``source.frames_in_other_splits``
names the frames each sample does not hold. Scenes of a split: categories sorted, then sequence
names sorted.

Per sample: views sorted by ``frame_number`` (a duplicate is an error); per view K / c2w from the
viewpoint (``opencv_from_pytorch3d``) with that frame's ``image.size``, checked against the image
file; extras ``mask``, ``depth``, ``depth_mask`` (the source's PNG bytes) when every frame has one;
depth's per-view ``scale_adjustment`` and the decoding rule in ``meta.json`` ``extras_info``.
Frames PyTorch3D drops by default (empty masks, ``remove_empty_masks``) are kept: the mask mass of
every view is in ``extras_info.mask.mass``.
"""
from __future__ import annotations

import gzip
import json
import os
from typing import Any, Iterator, Sequence

import numpy as np

from pipeline import cameras
from pipeline.schema import SourceError, SourceScene
from pipeline.sources import read_each, read_view_image

FRAME_ANNOTATIONS = 'frame_annotations.jgz'
SEQUENCE_ANNOTATIONS = 'sequence_annotations.jgz'
# Without --subset (PyTorch3D has no default): the only subset, else the first of these that every
# category has (co3d README's CO3Dv2 subsets).
DEFAULT_SUBSETS = ('fewview_dev', 'fewview_test', 'manyview_dev_0', 'manyview_dev_1',
                   'manyview_test')
NO_SUBSET_SPLIT = 'train'
_SPLIT_ORDER = ('train', 'val', 'test')
# PyTorch3D view axes (x left, y up, z forward) -> OpenCV (x right, y down, z forward)
OPENCV_FROM_PYTORCH3D = np.diag([-1.0, -1.0, 1.0])
DEPTH_ENCODING = ('uint16 PNG whose 16-bit values are float16 bit patterns: depth = '
                  'numpy.frombuffer(uint16 pixels, float16) * scale_adjustment (per view), non-finite '
                  '-> 0; z-depth along the optical axis in the sequence\'s world units '
                  '(PyTorch3D implicitron/dataset/utils.py load_16big_png_depth, load_depth)')
EXTRA_KINDS = ('mask', 'depth', 'depth_mask')


def opencv_from_pytorch3d(R, T, focal_length, principal_point, intrinsics_format: str,
                          height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(K [3, 3] pixels, world_from_cam [4, 4] OpenCV axes) of a CO3D ``viewpoint``.

    PyTorch3D: ``X_view = X_world @ R + T`` (row vectors), view axes +x left, +y up, +z forward;
    ``focal_length``, ``principal_point`` in NDC: 'ndc_isotropic' (the shorter side spans [-1, 1])
    or the legacy 'ndc_norm_image_bounds' (each side spans [-1, 1]; first made isotropic by
    multiplying with (W, H) / min(W, H), as implicitron's frame_data does). Then with
    ``s = min(W, H) / 2``: ``fx, fy = f s``, ``cx, cy = (W, H) / 2 - p s`` (PyTorch3D's
    ``_opencv_from_cameras_projection``; screen (0, 0) is the top-left corner, like ours).
    """
    R = np.asarray(R, dtype=np.float64)
    T = np.asarray(T, dtype=np.float64)
    f = np.asarray(focal_length, dtype=np.float64)
    p = np.asarray(principal_point, dtype=np.float64)
    if R.shape != (3, 3) or T.shape != (3,) or f.shape != (2,) or p.shape != (2,):
        raise ValueError(f'viewpoint needs R 3x3, T 3, focal_length 2, principal_point 2; got '
                         f'{list(R.shape)}, {list(T.shape)}, {list(f.shape)}, {list(p.shape)}')
    size_wh = np.array([width, height], dtype=np.float64)
    if intrinsics_format == 'ndc_norm_image_bounds':
        f, p = f * size_wh / size_wh.min(), p * size_wh / size_wh.min()
    elif intrinsics_format != 'ndc_isotropic':
        raise ValueError(f'unknown intrinsics_format {intrinsics_format!r} (PyTorch3D knows '
                         "'ndc_norm_image_bounds' and 'ndc_isotropic')")
    s = size_wh.min() / 2.0
    fx, fy = f * s
    cx, cy = size_wh / 2.0 - p * s
    K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
    cam_from_world = np.eye(4)
    # The flip: transpose the row-vector R, then negate the view's x and y axes.
    cam_from_world[:3, :3] = OPENCV_FROM_PYTORCH3D @ R.T
    cam_from_world[:3, 3] = OPENCV_FROM_PYTORCH3D @ T
    return K, cameras.invert_pose(cam_from_world)


def _load_jgz(path: str) -> list:
    try:
        with gzip.open(path, 'rt', encoding='utf8') as f:
            data = json.load(f)
    except (OSError, EOFError, ValueError) as e:
        raise SourceError(f'{path}: unreadable annotation file: {e}') from None
    if not isinstance(data, list):
        raise SourceError(f'{path}: expected a JSON list of annotations, got {type(data).__name__}')
    return data


class CO3DSource:
    fixed_members = False  # sequences differ in frame count
    def __init__(self, root: str, dataset: str = 'co3d', subset: str | None = None):
        self.root, self.dataset = str(root), dataset
        if os.path.isfile(os.path.join(self.root, FRAME_ANNOTATIONS)):  # one category folder
            self.data_root = os.path.dirname(os.path.abspath(self.root))
            self.categories = [os.path.basename(os.path.abspath(self.root))]
        else:
            self.data_root = self.root
            names = sorted(os.listdir(self.root)) if os.path.isdir(self.root) else []
            self.categories = [c for c in names
                               if os.path.isfile(os.path.join(self.root, c, FRAME_ANNOTATIONS))]
        if not self.categories:
            raise SourceError(f'{self.root}: no {FRAME_ANNOTATIONS} in it or its sub-folders (is it '
                              'a CO3D v2 root or category folder?)')
        self.subset = self._choose_subset(subset)
        self.set_lists = {c: self._read_set_list(c) for c in self.categories} if self.subset else {}
        found = {s for lists in self.set_lists.values() for s in lists}
        self._splits = ([s for s in _SPLIT_ORDER if s in found] + sorted(found - set(_SPLIT_ORDER))
                        if self.subset else [NO_SUBSET_SPLIT])
        self._cache: tuple[str, dict, dict] | None = None

    def _category_dir(self, category: str) -> str:
        return os.path.join(self.data_root, category)

    def _choose_subset(self, subset: str | None) -> str | None:
        have = {}
        for c in self.categories:
            folder = os.path.join(self._category_dir(c), 'set_lists')
            names = os.listdir(folder) if os.path.isdir(folder) else []
            have[c] = {n[len('set_lists_'):-len('.json')] for n in names
                       if n.startswith('set_lists_') and n.endswith('.json')}
        if subset is not None:
            lacking = [c for c in self.categories if subset not in have[c]]
            if lacking:
                raise SourceError(f'{self._category_dir(lacking[0])}/set_lists: no '
                                  f'set_lists_{subset}.json (categories without it: {lacking[:5]}; '
                                  f'this one has {sorted(have[lacking[0]])})')
            return subset
        every = set.intersection(*have.values())
        anywhere = set.union(*have.values())
        if not anywhere:
            return None
        if len(anywhere) == 1 and every:
            return next(iter(every))
        for name in DEFAULT_SUBSETS:
            if name in every:
                return name
        if not every:
            raise SourceError(f'{self.root}: its categories share no set list ('
                              + '; '.join(f'{c}: {sorted(have[c]) or "none"}' for c in
                                          self.categories[:5])
                              + '): convert the categories apart (--src <root>/<category>)')
        raise SourceError(f'{self.root}: several subsets ({sorted(anywhere)}); choose one with '
                          '--subset')

    def _read_set_list(self, category: str) -> dict[str, dict[str, list]]:
        """{split: {sequence: [[frame_number, image_path], ...]}} of the chosen subset."""
        path = os.path.join(self._category_dir(category), 'set_lists',
                            f'set_lists_{self.subset}.json')
        try:
            with open(path) as f:
                lists = json.load(f)
            out = {}
            for split, entries in lists.items():
                per_seq = out.setdefault(split, {})
                for seq, number, image_path in entries:
                    per_seq.setdefault(str(seq), []).append([int(number), image_path])
        except (OSError, ValueError, TypeError) as e:
            raise SourceError(f'{path}: unreadable set list (expected {{split: [[sequence_name, '
                              f'frame_number, image_path], ...]}}): {e}') from None
        return out

    def splits(self) -> list[str]:
        return list(self._splits)

    def scene_refs(self, split: str) -> list[str]:
        if split not in self._splits:
            return []
        refs = []
        for c in self.categories:
            if self.subset:
                seqs = sorted(self.set_lists[c].get(split, {}))
            else:
                seqs = sorted(self._annotations(c)[0])
            refs += [f'{c}/{s}' for s in seqs]
        return refs

    def _annotations(self, category: str) -> tuple[dict, dict]:
        """({sequence: [frame annotation]}, {sequence: sequence annotation}) of a category; the
        last category read is kept (scenes come category by category)."""
        if self._cache is None or self._cache[0] != category:
            base = self._category_dir(category)
            frames: dict[str, list] = {}
            for i, fr in enumerate(_load_jgz(os.path.join(base, FRAME_ANNOTATIONS))):
                if not isinstance(fr, dict) or 'sequence_name' not in fr:
                    raise SourceError(f'{base}/{FRAME_ANNOTATIONS}: entry {i} is not a frame '
                                      'annotation (no sequence_name)')
                frames.setdefault(str(fr['sequence_name']), []).append(fr)
            seq_path = os.path.join(base, SEQUENCE_ANNOTATIONS)
            seqs = ({str(s.get('sequence_name')): s for s in _load_jgz(seq_path)
                     if isinstance(s, dict)} if os.path.isfile(seq_path) else {})
            self._cache = (category, frames, seqs)
        return self._cache[1], self._cache[2]

    def read(self, split: str, refs: Sequence[str], start_index: int
             ) -> Iterator[SourceScene | SourceError]:
        return read_each(self._read_scene, split, refs, start_index)

    def _read_scene(self, split: str, ref: str, index: int) -> SourceScene:
        try:
            return self._scene(split, ref, index)
        except SourceError as e:  # for the skipped-scene log
            e.scene_id = ref if e.scene_id is None else e.scene_id
            e.source_file = e.source_file or os.path.join(
                self._category_dir(ref.split('/', 1)[0]), FRAME_ANNOTATIONS)
            raise

    def _scene(self, split: str, ref: str, index: int) -> SourceScene:
        category, seq = ref.split('/', 1)
        jgz = os.path.join(self._category_dir(category), FRAME_ANNOTATIONS)
        all_frames, seq_annots = self._annotations(category)
        by_number = {}
        for fr in all_frames.get(seq, []):
            n = fr.get('frame_number')
            if n in by_number:
                raise SourceError(f'{jgz}: sequence {seq} has frame_number {n} twice (images '
                                  f'{by_number[n]["image"]["path"]} and {fr["image"]["path"]})')
            by_number[n] = fr
        if not by_number:
            raise SourceError(f'{jgz}: no frames of sequence {seq} (scene {ref})')
        numbers, other = self._listed(category, seq, split, by_number, jgz)
        frames = [by_number[n] for n in sorted(numbers)]
        views = [_read_view(self.data_root, fr, v, ref, jgz) for v, fr in enumerate(frames)]
        images = [data for data, _, _, _ in views]
        fmts = {fmt for _, fmt, _, _ in views}
        if len(fmts) > 1:
            raise SourceError(f'{jgz}: sequence {seq} mixes image formats {sorted(fmts)}')
        extras, info, omitted = _extras(self.data_root, frames, ref)
        seq_annot = seq_annots.get(seq)
        return SourceScene(
            dataset=self.dataset, split=split, scene_id=ref, reference_index=index,
            view_names=[os.path.basename(fr['image']['path']) for fr in frames], images=images,
            K=np.stack([K for _, _, K, _ in views]), c2w=np.stack([c for _, _, _, c in views]),
            extras=extras, extras_ext={k: 'png' for k in extras},
            source_meta={
                'category': (seq_annot or {}).get('category', category), 'sequence_name': seq,
                'sequence_annotation': seq_annot, 'subset': self.subset,
                'frame_numbers': [fr['frame_number'] for fr in frames],
                'frame_timestamps': [fr.get('frame_timestamp') for fr in frames],
                'image_paths': [fr['image']['path'] for fr in frames],
                'intrinsics_formats': [_format(fr) for fr in frames],
                'frame_meta': [fr.get('meta') for fr in frames],
                'frames_in_other_splits': other, 'frames_in_no_split': sorted(
                    set(by_number) - set(numbers) - {n for ns in other.values() for n in ns}),
                'extras_omitted': omitted},
            origin=jgz, source_format='co3d_v2',
            source_camera_convention="PyTorch3D PerspectiveCameras per frame: X_view = X_world @ R "
                                     "+ T (row vectors; view x left, y up, z forward), focal_length "
                                     "and principal_point in NDC ('ndc_norm_image_bounds' or "
                                     "'ndc_isotropic')",
            camera_conversion='legacy NDC made isotropic (* (W, H) / min(W, H)); s = min(W, H) / 2; '
                              'K = [[f_x s, 0, W/2 - p_x s], [0, f_y s, H/2 - p_y s], [0, 0, 1]]; '
                              'c2w = inv([diag(-1, -1, 1) R^T | diag(-1, -1, 1) T]), per frame with '
                              'its own image size',
            world_frame={'description': "the sequence's own reconstruction frame (CO3D's COLMAP "
                                        'world of the video: arbitrary orientation, origin and '
                                        'scale), unchanged'},
            extras_info=info, up_axis=None, canonical_frame='input_view_pose')

    def describe(self) -> dict[str, Any]:
        return {'dataset': self.dataset, 'format': 'CO3D v2 (frame/sequence annotations, set lists)',
                'path': self.root, 'subset': self.subset, 'categories': self.categories,
                'title': 'Common Objects in 3D v2 (CO3D v2, Reizenstein et al.)',
                'url': 'https://github.com/facebookresearch/co3d',
                'licence': "CO3D's terms (see its repository; the code is CC BY-NC 4.0) apply to "
                           'these shards.'}

    def _listed(self, category: str, seq: str, split: str, by_number: dict, jgz: str
                ) -> tuple[list[int], dict[str, list[int]]]:
        """Frame numbers of the sequence in this split and in the subset's other splits; every
        listed frame must exist with the listed image path (PyTorch3D asserts both)."""
        if not self.subset:
            return sorted(by_number), {}
        path = os.path.join(self._category_dir(category), 'set_lists',
                            f'set_lists_{self.subset}.json')
        out = {}
        for s, per_seq in self.set_lists[category].items():
            numbers = []
            for n, image_path in per_seq.get(seq, []):
                fr = by_number.get(n)
                if fr is None:
                    raise SourceError(f'{path}: split {s} lists frame {n} of sequence {seq}, which '
                                      f'{jgz} does not have')
                if os.path.normpath(fr['image']['path']) != os.path.normpath(image_path):
                    raise SourceError(f'{path}: split {s} gives frame {n} of sequence {seq} the '
                                      f'image {image_path}, the annotation {fr["image"]["path"]}')
                numbers.append(n)
            if numbers:
                out[s] = sorted(set(numbers))
        mine = out.pop(split, [])
        return mine, out


def _format(frame: dict) -> str:
    # FrameAnnotation's dataclass default when the key is absent
    return (frame.get('viewpoint') or {}).get('intrinsics_format', 'ndc_norm_image_bounds')


def _read_view(data_root: str, fr: dict, v: int, ref: str, jgz: str):
    """(image bytes, 'png'|'jpeg', K, c2w) of one frame; SourceError naming file and frame."""
    at = f'{jgz}: sequence {fr.get("sequence_name")} frame {fr.get("frame_number")}'
    if fr.get('viewpoint', {}) is None:  # allowed by data_types.py (Optional), but no camera
        raise SourceError(f'{at}: viewpoint is null, so this view has no camera (rerun with '
                          '--skip-bad to record its sequence as skipped)')
    try:
        image_path, (H, W) = fr['image']['path'], fr['image']['size']
        vp = fr['viewpoint']
        K, c2w = opencv_from_pytorch3d(vp['R'], vp['T'], vp['focal_length'],
                                       vp['principal_point'], _format(fr), int(H), int(W))
    except (KeyError, TypeError, ValueError) as e:
        raise SourceError(f'{at}: bad annotation (image {{path, size}} and viewpoint {{R, T, '
                          f'focal_length, principal_point}} needed): {e}') from None
    data, (w, h, _, fmt) = read_view_image(os.path.join(data_root, image_path), v, ref)
    if (h, w) != (int(H), int(W)):
        raise SourceError(f'{os.path.join(data_root, image_path)}: image is {w}x{h}, the annotation '
                          f'says image.size [H, W] = [{H}, {W}] ({at})')
    return data, fmt, K, c2w


def _extras(data_root: str, frames: list[dict], ref: str) -> tuple[dict, dict, dict]:
    """The mask, depth and depth_mask bytes of every frame (a kind only when every frame has one;
    otherwise named in 'omitted'), and their extras_info."""
    paths = {'mask': [(fr.get('mask') or {}).get('path') for fr in frames],
             'depth': [(fr.get('depth') or {}).get('path') for fr in frames],
             'depth_mask': [(fr.get('depth') or {}).get('mask_path') for fr in frames]}
    extras, omitted = {}, {}
    for kind in EXTRA_KINDS:
        have = [p is not None for p in paths[kind]]
        if not all(have):
            if any(have):
                omitted[kind] = f'{len(have) - sum(have)} of {len(have)} frames have none'
            continue
        values = []
        for v, p in enumerate(paths[kind]):
            full = os.path.join(data_root, p)
            if not os.path.isfile(full):
                raise SourceError(f'{full}: missing {kind} file of view {v} (scene {ref})')
            with open(full, 'rb') as f:
                values.append(f.read())
        extras[kind] = values
    info = {}
    if 'mask' in extras:
        info['mask'] = {'encoding': '8-bit PNG of P(foreground) * 255 (soft); PyTorch3D divides by '
                                    '255', 'mass': [(fr['mask'] or {}).get('mass') for fr in frames]}
    if 'depth' in extras:
        info['depth'] = {'encoding': DEPTH_ENCODING,
                         'scale_adjustment': [fr['depth'].get('scale_adjustment') for fr in frames]}
    if 'depth_mask' in extras:
        info['depth_mask'] = {'encoding': 'PNG; depth is valid where the pixel (as L) is > 0'}
    return extras, info, omitted
