"""nerfstudio ``transforms.json`` source reader: DL3DV-10K and any nerfstudio-processed capture.

One scene per capture folder (a folder holding ``transforms.json``). ``--src`` is either one capture
folder or a tree of them (DL3DV's ``<subset>/<hash>/`` downloads, its benchmark's
``<hash>/nerfstudio/``); the scene id is the capture folder's path relative to ``--src`` (the folder's
own name for a single capture). Every capture becomes a scene of ONE split (``split``, default
'train'): nerfstudio's ``train_filenames``/``val_filenames``/``test_filenames`` split the frames of
one capture for per-scene optimisation, not scenes; they are kept in ``meta.json`` as view indices
(``source.frame_splits``).

Read as nerfstudio's dataparser reads it (``nerfstudio/data/dataparsers/nerfstudio_dataparser.py``,
docs/FORMATS: nerfstudio):

- intrinsics ``fl_x, fl_y, cx, cy, h, w`` at the top level (shared) or in every frame;
- distortion shared if any of ``k1, k2, k3, p1, p2, distortion_params`` is at the top level, else per
  frame; ``distortion_params`` = ``[k1, k2, k3, k4, p1, p2]`` overrides the named keys, missing
  ones are 0. Stored in ``meta.json`` ``distortion``; images stay as captured (distorted) and
  ``K``/``c2w`` are the pinhole part;
- ``camera_model`` at the top level (a frame's own is ignored, as nerfstudio ignores it, unless it
  names another kind of model); perspective models only (a fisheye or panorama has no pinhole
  part to store);
- downscale N: ``downscale`` if given, else nerfstudio's automatic rule (largest power of two with
  the first frame's full-resolution size / N <= 1600 px whose ``images_N/`` file exists). When the
  full-resolution image is missing (DL3DV's 480P/960P downloads hold only ``images_4/`` or
  ``images_8/``), nerfstudio fails; we take the smallest N whose ``images_N/`` holds the file (the
  highest resolution present). N > 1 opens ``images_N/<file name>`` (any sub-folder of ``file_path``
  dropped), scales ``fl_x, fl_y, cx, cy`` by 1/N and expects images of ``floor(h/N) x floor(w/N)``;
- views sorted as nerfstudio sorts them: by the resolved image path, component by component;
- ``applied_transform`` and ``applied_scale`` recorded as found (never applied, never assumed: DL3DV's
  pre-2024 value differs from today's), in ``meta.json`` ``world_frame``.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import re
from typing import Any, Iterator, Sequence

import numpy as np

from pipeline import cameras
from pipeline.schema import SourceError, SourceScene
from pipeline.sources import read_each, read_view_image

TRANSFORMS = 'transforms.json'
PERSPECTIVE_MODELS = ('SIMPLE_PINHOLE', 'PINHOLE', 'SIMPLE_RADIAL', 'RADIAL', 'OPENCV')
DISTORTION_KEYS = ('k1', 'k2', 'k3', 'k4', 'p1', 'p2')  # the order of distortion_params
_SHARED_DISTORTION_KEYS = ('k1', 'k2', 'k3', 'p1', 'p2', 'distortion_params')  # k4 alone: per frame
INTRINSIC_KEYS = ('fl_x', 'fl_y', 'cx', 'cy', 'h', 'w')
MAX_AUTO_RESOLUTION = 1600  # nerfstudio_dataparser.py MAX_AUTO_RESOLUTION
# OpenGL camera axes (x right, y up, looking down -z) -> OpenCV (x right, y down, +z forward).
OPENGL_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])
_DATA_FOLDER = re.compile(r'(images|masks|depths)(_\d+)?|colmap|sparse')
_KNOWN_FRAME_KEYS = set(INTRINSIC_KEYS) | set(DISTORTION_KEYS) | {
    'distortion_params', 'file_path', 'transform_matrix', 'mask_path', 'depth_file_path'}
DISTORTION_FORMULA = ('r = x^2 + y^2; d = 1 + r (k1 + r (k2 + r (k3 + r k4))); '
                      'xd = x d + 2 p1 x y + p2 (r + 2 x^2); yd = y d + 2 p2 x y + p1 (r + 2 y^2) '
                      '(x, y: normalised pinhole coordinates, nerfstudio camera_utils)')


def opencv_from_nerfstudio(transform_matrix) -> np.ndarray:
    """world_from_cam [4, 4] with OpenCV camera axes from a nerfstudio ``transform_matrix`` (4x4 or
    3x4 camera-to-world, OpenGL camera axes); the world (nerfstudio's saved frame) is unchanged."""
    T = np.asarray(transform_matrix, dtype=np.float64)
    if T.shape == (3, 4):
        T = np.vstack([T, [0.0, 0.0, 0.0, 1.0]])
    # The one flip: negate the camera's y and z axes (columns 1 and 2), OpenGL -> OpenCV.
    return T @ OPENGL_TO_OPENCV


def find_captures(root: str) -> list[str]:
    """Capture folders under ``root`` (those holding transforms.json) as paths relative to it,
    sorted; ['.'] when root is a capture itself. Image and COLMAP folders and hidden folders are
    not searched, nor the inside of a capture."""
    if os.path.isfile(os.path.join(root, TRANSFORMS)):
        return ['.']
    found, seen = [], set()
    # Symlinked folders are followed (dataset roots are often assembled from links); a folder
    # reached twice (a link loop, or two links to one capture) is searched once.
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        if TRANSFORMS in filenames and dirpath != root:
            found.append(os.path.relpath(dirpath, root).replace(os.sep, '/'))
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames
                             if not d.startswith('.') and not _DATA_FOLDER.fullmatch(d))
    return sorted(found, key=lambda p: p.split('/'))


def _number(value, what: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise SourceError(f'{what}: not a number ({value!r})') from None
    if not math.isfinite(x):
        raise SourceError(f'{what}: not finite ({value!r})')
    return x


def _distortion(d: dict, where: str) -> list[float]:
    """[k1, k2, k3, k4, p1, p2] of a dict (top level or frame) as nerfstudio reads it."""
    if 'distortion_params' in d:
        params = d['distortion_params']
        if not isinstance(params, list) or len(params) != 6:
            raise SourceError(f'{where}: distortion_params must be 6 numbers [k1, k2, k3, k4, p1, '
                              f'p2], got {params!r}')
        return [_number(p, f'{where}: distortion_params') for p in params]
    return [_number(d.get(k, 0.0), f'{where}: {k}') for k in DISTORTION_KEYS]


def auto_downscale(data_dir: str, first_file: str, where: str) -> int:
    """nerfstudio's automatic downscale factor (decided once, from the first frame), or, when
    the full-resolution file is missing, the smallest N whose ``images_N`` folder holds its file
    name (the highest resolution present)."""
    from pipeline.schema import image_info
    path = os.path.join(data_dir, first_file)
    name = os.path.basename(first_file)
    if not os.path.isfile(path):
        found = sorted(int(m.group(1)) for d in os.listdir(data_dir)
                       if (m := re.fullmatch(r'images_(\d+)', d))
                       and os.path.isfile(os.path.join(data_dir, d, name)))
        if found:
            return found[0]
        raise SourceError(f'{path}: full-resolution image missing and no images_N folder holds '
                          f'{name}; pass --downscale N')
    with open(path, 'rb') as f:
        width, height, _, _ = image_info(f.read(), path)
    df = 0
    while max(width, height) / 2 ** df > MAX_AUTO_RESOLUTION and os.path.isfile(
            os.path.join(data_dir, f'images_{2 ** (df + 1)}', name)):
        df += 1
    return 2 ** df


def _resolve(data_dir: str, file_path: str, downscale: int, prefix: str) -> str:
    """nerfstudio's ``_get_fname``: N > 1 keeps only the file name, under ``<prefix>N``."""
    if downscale > 1:
        return os.path.join(data_dir, f'{prefix}{downscale}', pathlib.PurePath(file_path).name)
    return os.path.join(data_dir, file_path)


def _sort_key(path: str) -> tuple:
    # numpy.argsort of pathlib.Path objects: compared part by part (not as one string)
    return pathlib.PurePosixPath(path.replace(os.sep, '/')).parts


class NerfstudioSource:
    fixed_members = False  # captures differ in view count and extras
    def __init__(self, root: str, dataset: str = 'nerfstudio', downscale: int | None = None,
                 split: str = 'train'):
        self.root, self.dataset, self.split = str(root), dataset, split
        if downscale is not None and downscale < 1:
            raise ValueError(f'--downscale must be >= 1, got {downscale}')
        self.downscale = downscale
        if not os.path.isdir(self.root):
            raise SourceError(f'{self.root}: not a directory')
        self.captures = find_captures(self.root)
        if not self.captures:
            raise SourceError(f'{self.root}: no {TRANSFORMS} found (is it a nerfstudio capture '
                              'folder, or a folder of them?)')

    def splits(self) -> list[str]:
        return [self.split]

    def scene_refs(self, split: str) -> list[str]:
        return list(self.captures) if split == self.split else []

    def read(self, split: str, refs: Sequence[str], start_index: int
             ) -> Iterator[SourceScene | SourceError]:
        return read_each(self._read_scene, split, refs, start_index)

    def scene_id(self, ref: str) -> str:
        return os.path.basename(os.path.abspath(self.root)) if ref == '.' else ref

    def _read_scene(self, split: str, ref: str, index: int) -> SourceScene:
        try:
            return self._scene(split, ref, index)
        except SourceError as e:  # for the skipped-scene log
            e.scene_id = self.scene_id(ref) if e.scene_id is None else e.scene_id
            e.source_file = e.source_file or os.path.join(self.root, ref, TRANSFORMS)
            raise

    def _scene(self, split: str, ref: str, index: int) -> SourceScene:
        data_dir = os.path.normpath(os.path.join(self.root, ref))
        path = os.path.join(data_dir, TRANSFORMS)
        try:
            with open(path, 'rb') as f:
                meta = json.loads(f.read())
        except (OSError, ValueError) as e:
            raise SourceError(f'{path}: unreadable transforms.json (scene {ref}): {e}') from None
        if not isinstance(meta, dict) or not isinstance(meta.get('frames'), list) \
                or not meta['frames']:
            raise SourceError(f'{path}: no "frames" list (scene {ref})')
        cap = parse_transforms(meta, data_dir, self.downscale, path)
        images, fmt = [], None
        for v, (name, file) in enumerate(zip(cap['views'], cap['files'])):
            data, (w, h, _, kind) = read_view_image(file, f'{v} ({name})', ref)
            fmt = fmt or kind
            if kind != fmt:
                raise SourceError(f'{file}: a {kind} image among {fmt} views (scene {ref})')
            if (h, w) != tuple(cap['sizes'][v]):
                raise SourceError(
                    f'{file}: image is {w}x{h} but transforms.json gives w x h = '
                    f'{cap["full_sizes"][v][1]}x{cap["full_sizes"][v][0]}, so downscale '
                    f'{cap["downscale"]} needs floor(w/N) x floor(h/N) = {cap["sizes"][v][1]}x'
                    f'{cap["sizes"][v][0]} (scene {ref}; wrong --downscale?)')
            images.append(data)
        extras, extras_ext = {}, {}
        for kind, files in cap['extra_files'].items():
            extras[kind] = [_read_extra(f, kind, v, ref) for v, f in enumerate(files)]
            extras_ext[kind] = _extra_ext(files[0])
        return SourceScene(
            dataset=self.dataset, split=split, scene_id=self.scene_id(ref), reference_index=index,
            view_names=cap['views'], images=images, K=cap['K'], c2w=cap['c2w'],
            extras=extras, extras_ext=extras_ext, source_meta=cap['source_meta'], origin=path,
            source_format='nerfstudio',
            source_camera_convention='transforms.json: transform_matrix camera-to-world with '
                                     'OpenGL camera axes (x right, y up, -z forward); fl_x, fl_y, '
                                     'cx, cy in pixels of the w x h frames',
            camera_conversion=f'c2w = transform_matrix @ diag(1, -1, -1, 1); K = [[fl_x, 0, cx], '
                              f'[0, fl_y, cy], [0, 0, 1]] / {cap["downscale"]} (images_N: N = '
                              f'{cap["downscale"]}), as nerfstudio rescales',
            distortion=cap['distortion'], world_frame=cap['world_frame'],
            extras_info=cap['extras_info'], up_axis=None, canonical_frame='input_view_pose')

    def describe(self) -> dict[str, Any]:
        d = {'dataset': self.dataset, 'format': 'nerfstudio transforms.json captures',
             'path': self.root, 'downscale': self.downscale, 'split': self.split,
             'num_captures': len(self.captures),
             'title': f'{self.dataset}: nerfstudio-processed captures (transforms.json)',
             'url': 'https://docs.nerf.studio/quickstart/data_conventions.html',
             'licence': "The capture's own terms apply to these shards."}
        if self.dataset.lower().startswith('dl3dv'):
            d.update(title='DL3DV-10K (Ling et al.), nerfstudio-processed captures',
                     url='https://github.com/DL3DV-10K/Dataset',
                     licence='DL3DV-10K Terms of Use (https://github.com/DL3DV-10K/Dataset, '
                             'License.md) apply to these shards.')
        return d


def _extra_ext(path: str) -> str:
    ext = os.path.splitext(path)[1].lower().lstrip('.')
    return {'jpeg': 'jpg'}.get(ext, ext)


def _read_extra(path: str, kind: str, view: int, ref: str) -> bytes:
    if not os.path.isfile(path):
        raise SourceError(f'{path}: missing {kind} file of view {view} (scene {ref})')
    with open(path, 'rb') as f:
        return f.read()


def parse_transforms(meta: dict, data_dir: str, downscale: int | None, where: str) -> dict:
    """The cameras and files of one transforms.json (``meta``, already loaded), views sorted as
    nerfstudio sorts them. Returns 'views' (file_path per view), 'files' (resolved image paths),
    'K' [v, 3, 3] (pixels of the images_N files), 'c2w' [v, 4, 4] (OpenCV, saved world), 'sizes' and
    'full_sizes' [[h, w]] (images_N and transforms.json), 'downscale', 'distortion', 'world_frame',
    'extra_files' {kind: [path]}, 'extras_info', 'source_meta'. SourceError names ``where``, the
    frame and the key for anything nerfstudio would refuse or that is not a rigid camera."""
    frames = meta['frames']
    model = meta.get('camera_model')
    if model is not None and model not in PERSPECTIVE_MODELS:
        raise SourceError(f'{where}: camera_model {model!r} is not a perspective model '
                          f'{PERSPECTIVE_MODELS}: no pinhole K/c2w can describe it')
    for i, fr in enumerate(frames):
        if not isinstance(fr, dict) or 'file_path' not in fr or 'transform_matrix' not in fr:
            raise SourceError(f'{where}: frame {i} lacks file_path or transform_matrix')
        # nerfstudio ignores a frame's camera_model (it reads the top level's, else PERSPECTIVE):
        # so do we, unless it names a model that no pinhole K/c2w could describe.
        if fr.get('camera_model', model) not in (model, *PERSPECTIVE_MODELS):
            raise SourceError(f'{where}: frame {i} ({fr["file_path"]}) has camera_model '
                              f'{fr["camera_model"]!r}, not a perspective model '
                              f'{PERSPECTIVE_MODELS}: no pinhole K/c2w can describe it')
    N = downscale or auto_downscale(data_dir, frames[0]['file_path'], where)
    files = [_resolve(data_dir, fr['file_path'], N, 'images_') for fr in frames]
    order = sorted(range(len(frames)), key=lambda i: _sort_key(files[i]))
    for a, b in zip(order, order[1:]):
        if _sort_key(files[a]) == _sort_key(files[b]):
            raise SourceError(f'{where}: frames {a} and {b} both load {files[a]}')
    frames, files = [frames[i] for i in order], [files[i] for i in order]
    shared_dist = any(k in meta for k in _SHARED_DISTORTION_KEYS)
    Ks, poses, sizes, full_sizes, dists = [], [], [], [], []
    for i, fr in enumerate(frames):
        at = f'{where}: frame {fr["file_path"]}'
        val = {}
        for k in INTRINSIC_KEYS:
            if k not in meta and k not in fr:
                raise SourceError(f'{at}: {k} is neither at the top level nor in the frame')
            val[k] = _number(meta[k] if k in meta else fr[k], f'{at}: {k}')
        full = [int(val['h']), int(val['w'])]
        full_sizes.append(full)
        sizes.append([full[0] // N, full[1] // N])  # nerfstudio floors h/N, w/N
        Ks.append(np.array([[val['fl_x'] / N, 0.0, val['cx'] / N],
                            [0.0, val['fl_y'] / N, val['cy'] / N], [0.0, 0.0, 1.0]]))
        dists.append(_distortion(meta, f'{where} (top level)') if shared_dist
                     else _distortion(fr, at))
        try:
            T = np.asarray(fr['transform_matrix'], dtype=np.float64)
        except (TypeError, ValueError):
            raise SourceError(f'{at}: transform_matrix is not a matrix of numbers') from None
        if T.shape not in ((4, 4), (3, 4)):
            raise SourceError(f'{at}: transform_matrix has shape {list(T.shape)}, expected 4x4')
        try:
            poses.append(cameras.check_pose(opencv_from_nerfstudio(T), 'transform_matrix'))
        except ValueError as e:
            raise SourceError(f'{at}: {e} (a camera-to-world matrix must be rigid and finite)'
                              ) from None
        try:
            cameras.check_intrinsics(Ks[-1])
        except ValueError as e:
            raise SourceError(f'{at}: {e}') from None
    return {'views': [fr['file_path'] for fr in frames], 'files': files, 'K': np.stack(Ks),
            'c2w': np.stack(poses), 'sizes': sizes, 'full_sizes': full_sizes, 'downscale': N,
            'distortion': _distortion_meta(model, dists),
            'world_frame': _world_frame(meta, data_dir),
            **_extras(frames, data_dir, N, where),
            'source_meta': _source_meta(meta, frames, files, data_dir, N, where)}


def _distortion_meta(model: str | None, dists: list[list[float]]) -> dict | None:
    if not any(any(d) for d in dists):
        return None
    per_view = any(d != dists[0] for d in dists)
    coeffs = {k: ([d[j] for d in dists] if per_view else dists[0][j])
              for j, k in enumerate(DISTORTION_KEYS)}
    return {'model': model or 'PERSPECTIVE (no camera_model given)', 'coeffs': coeffs,
            'per_view': per_view, 'formula': DISTORTION_FORMULA,
            'note': 'images are as captured (distorted); K/c2w are the pinhole part: the ray of '
                    'a pixel goes through K^-1 applied to its undistorted position'}


def _world_frame(meta: dict, data_dir: str) -> dict:
    applied, origin = meta.get('applied_transform'), 'transforms.json applied_transform'
    if applied is None:
        origin = None
        if os.path.isdir(os.path.join(data_dir, 'colmap', 'sparse', '0')):
            # nerfstudio's own fallback for files written before the key existed
            applied = [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, -1, 0]]
            origin = 'not in transforms.json; nerfstudio assumes its legacy value (colmap/sparse/0)'
    return {'description': "nerfstudio's saved world: saved = applied_transform @ original (e.g. "
                           'COLMAP) world, times applied_scale where given; poses are kept in the '
                           'saved world, unnormalised (nerfstudio re-centres and scales at load)',
            'applied_transform': applied, 'applied_transform_origin': origin,
            'applied_scale': meta.get('applied_scale')}


def _extras(frames: list[dict], data_dir: str, N: int, where: str) -> dict:
    """Masks (mask_path) and depths (depth_file_path): in every frame or none, as nerfstudio."""
    files, info = {}, {}
    for key, kind, prefix in (('mask_path', 'mask', 'masks_'), ('depth_file_path', 'depth',
                                                                 'depths_')):
        have = [key in fr for fr in frames]
        if any(have) and not all(have):
            raise SourceError(f'{where}: {key} is given for {sum(have)} of {len(frames)} frames '
                              '(nerfstudio needs it in every frame or none)')
        if all(have):
            files[kind] = [_resolve(data_dir, fr[key], N, prefix) for fr in frames]
            if len({_extra_ext(f) for f in files[kind]}) != 1 or \
                    _extra_ext(files[kind][0]) not in ('png', 'jpg', 'npy'):
                raise SourceError(f'{where}: {key} files must all be .png, .jpg or .npy')
    if 'mask' in files:
        info['mask'] = {'encoding': 'nerfstudio mask image: 0 = pixel ignored, else used'}
    if 'depth' in files:
        info['depth'] = {'encoding': 'nerfstudio depth image as captured (uint16 PNG: '
                                     'millimetres by default, depth_unit_scale_factor 1e-3)'}
    return {'extra_files': files, 'extras_info': info}


def _source_meta(meta: dict, frames: list[dict], files: list[str], data_dir: str, N: int,
                 where: str) -> dict:
    names = {_sort_key(f): v for v, f in enumerate(files)}
    frame_splits = {}
    for split in ('train', 'val', 'test'):
        listed = meta.get(f'{split}_filenames')
        if listed is None:
            continue
        idx = [names.get(_sort_key(_resolve(data_dir, x, N, 'images_'))) for x in listed]
        missing = [x for x, i in zip(listed, idx) if i is None]
        if missing:
            raise SourceError(f'{where}: {split}_filenames names frames that do not exist: '
                              f'{missing[:3]}')
        frame_splits[split] = sorted(idx)
    top = {k: v for k, v in meta.items() if k != 'frames' and not k.endswith('_filenames')}
    extra = [{k: v for k, v in fr.items() if k not in _KNOWN_FRAME_KEYS} for fr in frames]
    return {'downscale': N,
            'image_folder': f'images_{N}' if N > 1 else None,
            'camera_model': meta.get('camera_model'), 'top_level': top,
            'frame_splits': frame_splits or None,
            'frame_fields': extra if any(extra) else None}
