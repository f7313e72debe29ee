"""Write synthetic scenes (``pipeline.synthetic``) in the on-disk formats of the real datasets.

Each writer mirrors the test vectors in ``tests/data/testvectors/sources/`` (file names, dtypes,
keys), so the reference loaders and the project's source readers open the output unchanged:

- ``write_nmr``: NMR (DVR). ``DIR/metadata.yaml`` (class id -> {id, name}); per class
  ``DIR/<class>/softras_{train,val,test}.lst``; per scene ``DIR/<class>/<scene>/image/0000.png
  .. 0023.png`` (64x64 RGB, white background) and ``cameras.npz`` with float64 4x4 ``world_mat_i``,
  ``camera_mat_i``, ``world_mat_inv_i``, ``camera_mat_inv_i`` (``cameras.opencv_to_nmr``; camera_mat
  = diag(2.175, 2.175, 1, 1)). Classes: the main object's kind (``NMR_CLASSES``).
- ``write_obsurf`` (variant ``clevr3d`` or ``msn``): ObSuRF. ``DIR/metadata.npz`` (compressed) with
  per-scene arrays of leading length 100000 and ``DIR/images/img_<scene>_<view>.png`` (240x320
  RGBA, alpha 255, 3 views). The reference selects scenes by FIXED index ranges (CLEVR3D train
  0-70000, val 70000-75000, test 85000-100000; ObSuRF-MSN train 0-80000, val 80000-80500, test
  90000-100000) and drops scenes with more than ``max_objects`` objects, so a small set puts its
  scenes at the start of each range and marks every unused row as having ALL object slots filled
  (``shape`` = 1), with no images and zero cameras. For CLEVR3D (11 slots, 3-6 objects per scene)
  the reference's default ``max_objects=6`` then selects exactly the written scenes. ObSuRF-MSN has
  only 5 slots, which never exceed 6: read it with ``max_objects=4`` (its scenes have 2-4 objects),
  otherwise the unused rows of each range are selected too and have no images.
  Metadata arrays (S = 11 or 5 object slots):
  ``shape`` int64 [100000, S] (0 empty slot, else 1 sphere, 2 box, 3 cylinder);
  ``camera_pos`` float32 [100000, 3, 3] (the views look at the origin, z up);
  ``color`` float32 [100000, S, 3] (RGB in [0, 1]); ``size`` float32 [100000, S] (footprint
  radius); ``height`` float32 [100000, S] (full height); ``3d_coords`` float32 [100000, S, 3]
  (object centre); ``rotation`` float32 [100000, S] (yaw about +z, degrees).
- ``write_msn``: SRT MultiShapeNet, a TFDS directory ``DIR/multi_shapenet_frames/2.3.3/`` in sunds'
  frame layout with the test vector's ``features.json`` (10 cameras: ``color_image`` PNG 128x128x3,
  ``category_image`` 128x128x1 labelled ``CATEGORY_NAMES``, ``intrinsics``, ``extrinsics`` =
  camera_from_frame (``cameras.opencv_to_sunds``), identity frame ``pose``, ``scene_name`` =
  ``frame_name`` = ``scene_<n>``), tfrecord files ``multi_shapenet_frames-<split>.tfrecord-
  XXXXX-of-YYYYY`` and ``dataset_info.json``. Splits ``train`` and ``test`` as in MSN 2.3.3 (the
  reference's training script evaluates on split ``val``: pass ``split_sizes`` with a ``val`` entry
  to write one). Scene numbers: train from 0, val from 400000, test from 500000 (the test vector's
  test scenes are ``scene_5000xx``).

Scene i of a split is ``pipeline.synthetic`` scene (seed, split, i) in every format. Default splits
(``default_split_sizes``): 80/10/10 train/val/test (MSN: 90/10 train/test). Scenes are rendered and
PNG-encoded in worker processes (start method 'spawn', so a parent holding TensorFlow state is
safe); files are written in scene order by the parent, byte-identical for a given seed whatever the
number of workers. Each writer also drops ``SYNTHETIC_MARKER`` (a JSON summary) into ``DIR``.

Only ``write_msn`` imports TensorFlow / tensorflow_datasets, inside the function.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import math
import multiprocessing
import os
import pathlib
import zipfile
from typing import Callable, Iterator

import numpy as np
import yaml
from PIL import Image

from pipeline import cameras as C
from pipeline import synthetic as S

FORMATS = ('msn', 'nmr', 'obsurf', 'obsurf-msn', 'msn-demo')
SYNTHETIC_MARKER = 'srt_shards_synthetic.json'  # pipeline.card recognises generated sources by it

NMR_VIEWS, NMR_SIZE = 24, 64
# NMR class of a scene: the kind of its main object. Ids keep DVR's 8-digit style and stay strings
# in YAML (a leading 0 with an 8 or 9 in it is neither an int nor an octal).
NMR_CLASSES = {'09000001': 'sphere', '09000002': 'box', '09000003': 'cylinder'}
OBSURF_VIEWS, OBSURF_HEIGHT, OBSURF_WIDTH = 3, 240, 320
OBSURF_ROWS = 100000
OBSURF = {  # variant: (scene style, object slots, split index ranges of the reference)
    'clevr3d': ('clevr', 11, {'train': (0, 70000), 'val': (70000, 75000), 'test': (85000, 100000)}),
    'msn': ('obsurf-msn', 5, {'train': (0, 80000), 'val': (80000, 80500), 'test': (90000, 100000)}),
}
MSN_VIEWS, MSN_SIZE = 10, 128
MSN_NAME, MSN_VERSION = 'multi_shapenet_frames', '2.3.3'
MSN_SCENE_OFFSET = {'train': 0, 'val': 400000, 'test': 500000}

_STYLE = {'nmr': 'nmr', 'obsurf': 'clevr', 'obsurf-msn': 'obsurf-msn', 'msn': 'msn',
          'msn-demo': 'demo'}
# 'msn-demo': the MSN layout at a CPU-friendly size with the plain 'demo' scene style.
_MSN_SIZES = {'msn': MSN_SIZE, 'msn-demo': 64}
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed zip member dates: same seed, same bytes


@dataclasses.dataclass
class WriteResult:
    """What a writer wrote.

    ``root``: the directory to hand to a reader (NMR and ObSuRF roots; for MSN the TFDS data_dir
    holding ``multi_shapenet_frames/2.3.3``, which is ``dataset_dir``). ``scenes``: per split, the
    scene names as a reader sees them (NMR ``<class>/<scene>``, ObSuRF the metadata row as a
    string, MSN ``scene_<n>``), in writing order.
    """
    format: str
    root: pathlib.Path
    dataset_dir: pathlib.Path
    scenes: dict[str, list[str]]
    num_images: int  # colour images written
    image_bytes: int  # their PNG bytes

    @property
    def mean_png_bytes(self) -> float:
        return self.image_bytes / max(self.num_images, 1)


# ----------------------------------------------------------------------------- rendering (workers)

def default_split_sizes(fmt: str, num_scenes: int) -> dict[str, int]:
    """80/10/10 train/val/test (val and test get ceil(N / 10) each once N >= 3); MSN: train/test
    90/10 (test gets ceil(N / 10) once N >= 2)."""
    _check_format(fmt)
    if num_scenes < 0:
        raise ValueError(f'num_scenes must be >= 0, got {num_scenes}')
    if fmt in ('msn', 'msn-demo'):
        m = math.ceil(num_scenes / 10) if num_scenes >= 2 else 0
        return {'train': num_scenes - m, 'test': m}
    m = math.ceil(num_scenes / 10) if num_scenes >= 3 else 0
    return {'train': num_scenes - 2 * m, 'val': m, 'test': m}


def scene_cameras(fmt: str, seed: int, split: str, index: int) -> dict[str, np.ndarray]:
    """The cameras of scene ``index`` of ``split`` exactly as rendered and stored.

    Always 'K' [v, 3, 3] and 'world_from_cam' [v, 4, 4] (float64; what the renderer used). ObSuRF
    also 'camera_pos' [v, 3] float32 (stored; the cameras are built from these rounded values);
    MSN also 'K32', 'R', 't' float32 (stored intrinsics and camera_from_world extrinsics, the
    rendering cameras are built from them); NMR also 'nmr': the four DVR matrices per view.
    """
    _check_format(fmt)
    rng = S.scene_rng(seed, split, index, S.STREAM_CAMERAS)
    if fmt == 'nmr':
        K, poses = S.nmr_cameras(rng, NMR_VIEWS, NMR_SIZE, NMR_SIZE)
        mats = [C.opencv_to_nmr(K[i], poses[i], NMR_SIZE, NMR_SIZE) for i in range(NMR_VIEWS)]
        # exact zeros where DVR has them (the inverses leave ~1e-17 residue)
        mats = [{k: np.where(np.abs(v) < 1e-12, 0.0, v) for k, v in m.items()} for m in mats]
        return {'K': K, 'world_from_cam': poses, 'nmr': mats}
    if fmt in ('obsurf', 'obsurf-msn'):
        pos = S.obsurf_camera_positions(rng, OBSURF_VIEWS).astype(np.float32)
        cams = [C.obsurf_to_opencv(p.astype(np.float64), OBSURF_HEIGHT, OBSURF_WIDTH) for p in pos]
        return {'K': np.stack([c[0] for c in cams]),
                'world_from_cam': np.stack([c[1] for c in cams]), 'camera_pos': pos}
    size = _MSN_SIZES[fmt]
    # The demo's cameras are closer, so that its few objects fill more of the small images.
    distance = (6.5, 8.5) if fmt == 'msn-demo' else (9.0, 13.0)
    K, poses = S.msn_cameras(rng, MSN_VIEWS, size, size, distance=distance)
    Rt = [C.opencv_to_sunds(p) for p in poses]
    R = np.stack([r for r, _ in Rt]).astype(np.float32)
    t = np.stack([t for _, t in Rt]).astype(np.float32)
    K32 = K.astype(np.float32)
    world_from_cam = np.stack([C.sunds_to_opencv(K32[i], R[i], t[i])[1] for i in range(MSN_VIEWS)])
    return {'K': K32.astype(np.float64), 'world_from_cam': world_from_cam, 'K32': K32, 'R': R,
            't': t}


def render_scene(fmt: str, seed: int, split: str, index: int, *, noise: bool = True) -> dict:
    """Scene ``index`` of ``split`` as the writer of ``fmt`` renders it: 'scene' (``S.Scene``), the
    ``scene_cameras`` entries, and the stacked ``S.render`` outputs 'rgb' [v, h, w, 3], 'depth',
    'object_id', 'category' [v, h, w]. ``noise=False`` renders without the per-pixel noise."""
    cams = scene_cameras(fmt, seed, split, index)
    scene = S.sample_scene(_STYLE[fmt], seed, split, index)
    h, w = {'nmr': (NMR_SIZE, NMR_SIZE), 'msn': (MSN_SIZE, MSN_SIZE),
            'msn-demo': (_MSN_SIZES['msn-demo'],) * 2}.get(fmt, (OBSURF_HEIGHT, OBSURF_WIDTH))
    views = S.render_views(scene, cams['K'], cams['world_from_cam'], h, w, noise=noise, seed=seed,
                           split=split, index=index)
    return {'scene': scene, **cams, **views}


def png_bytes(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 image [h, w] or [h, w, c] (PIL, default compression; deterministic)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format='PNG')
    return buf.getvalue()


def _render_task(task: tuple[str, int, str, int]) -> dict:
    """Worker: render one scene and encode what its format stores (module level: picklable)."""
    fmt, seed, split, index = task
    r = render_scene(fmt, seed, split, index)
    scene = r['scene']
    if fmt == 'nmr':
        return {'class_id': list(NMR_CLASSES)[int(scene.kind[0])],
                'pngs': [png_bytes(im) for im in r['rgb']], 'nmr': r['nmr']}
    if fmt in ('msn', 'msn-demo'):
        return {'pngs': [png_bytes(im) for im in r['rgb']],
                'category_pngs': [png_bytes(c) for c in r['category']],  # 1-channel PNG
                'K32': r['K32'], 'R': r['R'], 't': r['t'], 'size': r['rgb'].shape[1]}
    alpha = np.full(r['rgb'].shape[1:3] + (1,), 255, dtype=np.uint8)
    return {'pngs': [png_bytes(np.concatenate([im, alpha], axis=-1)) for im in r['rgb']],
            'camera_pos': r['camera_pos'], 'objects': _object_fields(scene)}


def _object_fields(scene: S.Scene) -> dict[str, np.ndarray]:
    """The per-object ObSuRF metadata of one scene (arrays of length num_objects)."""
    return {'shape': scene.category.astype(np.int64), 'color': scene.color.astype(np.float32),
            'size': scene.radius.astype(np.float32),
            'height': (2 * scene.half_height).astype(np.float32),
            '3d_coords': scene.center.astype(np.float32),
            'rotation': np.degrees(scene.yaw).astype(np.float32)}


@contextlib.contextmanager
def _single_threaded_blas():
    """Workers inherit this environment: one BLAS thread each (the renderer's small matrix products
    run ~2x slower with OpenBLAS threads competing for the same cores)."""
    keys = ('OPENBLAS_NUM_THREADS', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS')
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: '1' for k in keys})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _render_all(tasks: list, workers: int | None, progress: Callable[[int], None] | None
                ) -> Iterator[dict]:
    """Render tasks in order in ``workers`` spawned processes (in this process if workers <= 1)."""
    workers = _default_workers() if workers is None else workers
    workers = max(1, min(workers, len(tasks)))
    if workers == 1:
        for task in tasks:
            yield _render_task(task)
            if progress:
                progress(1)
        return
    with _single_threaded_blas():
        pool = multiprocessing.get_context('spawn').Pool(workers)
    with pool:
        for result in pool.imap(_render_task, tasks, chunksize=2):
            yield result
            if progress:
                progress(1)


# ----------------------------------------------------------------------------- helpers

def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f'unknown format {fmt!r}; expected one of {FORMATS}')


def _resolve_splits(fmt: str, num_scenes: int, split_sizes: dict[str, int] | None
                    ) -> dict[str, int]:
    sizes = default_split_sizes(fmt, num_scenes) if split_sizes is None else dict(split_sizes)
    for split, n in sizes.items():
        if split not in S.SPLITS:
            raise ValueError(f'unknown split {split!r} in split_sizes; expected one of {S.SPLITS}')
        if n < 0:
            raise ValueError(f'split_sizes[{split!r}] must be >= 0, got {n}')
    if split_sizes is not None and sum(sizes.values()) != num_scenes:
        raise ValueError(f'split_sizes {sizes} add up to {sum(sizes.values())}, not num_scenes '
                         f'= {num_scenes}')
    return {s: sizes[s] for s in S.SPLITS if s in sizes}  # train, val, test order


def _tasks(fmt: str, seed: int, sizes: dict[str, int]) -> list[tuple[str, int, str, int]]:
    return [(fmt, seed, split, i) for split, n in sizes.items() for i in range(n)]


def save_npz(path, arrays: dict[str, np.ndarray], compress: bool) -> None:
    """np.savez(_compressed) with fixed member dates, so equal arrays give equal bytes."""
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, 'w', compression=method, allowZip64=True) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f'{name}.npy', date_time=_ZIP_DATE)
            info.compress_type = method
            with zf.open(info, 'w', force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)


def _write_marker(root: pathlib.Path, fmt: str, seed: int, scenes: dict[str, list[str]],
                  **extra) -> None:
    info = {'generator': 'srt-shards pipeline.synthetic_writers', 'format': fmt, 'seed': seed,
            'num_scenes': sum(len(v) for v in scenes.values()),
            'splits': {s: len(v) for s, v in scenes.items()}, **extra}
    (root / SYNTHETIC_MARKER).write_text(json.dumps(info, indent=2) + '\n')


# ----------------------------------------------------------------------------- NMR

def write_nmr(out_dir, num_scenes: int, seed: int = 0, *, split_sizes: dict[str, int] | None = None,
              workers: int | None = None, progress: Callable[[int], None] | None = None
              ) -> WriteResult:
    """Write ``num_scenes`` NMR-format scenes to ``out_dir`` (see the module docstring)."""
    root = pathlib.Path(out_dir)
    sizes = _resolve_splits('nmr', num_scenes, split_sizes)
    tasks = _tasks('nmr', seed, sizes)
    lists = {c: {s: [] for s in ('train', 'val', 'test')} for c in NMR_CLASSES}
    scenes = {s: [] for s in sizes}
    num_images = image_bytes = 0
    number = 0
    for (_, _, split, _), r in zip(tasks, _render_all(tasks, workers, progress)):
        name = f'scene{number:05d}'
        number += 1
        scene_dir = root / r['class_id'] / name
        (scene_dir / 'image').mkdir(parents=True, exist_ok=True)
        for v, data in enumerate(r['pngs']):
            (scene_dir / 'image' / f'{v:04d}.png').write_bytes(data)
            num_images += 1
            image_bytes += len(data)
        save_npz(scene_dir / 'cameras.npz', {f'{k}_{v}': m[k] for v, m in enumerate(r['nmr'])
                                             for k in ('world_mat', 'camera_mat', 'world_mat_inv',
                                                       'camera_mat_inv')}, compress=False)
        lists[r['class_id']][split].append(name)
        scenes[split].append(f'{r["class_id"]}/{name}')
    root.mkdir(parents=True, exist_ok=True)
    meta = {c: {'id': c, 'name': n} for c, n in NMR_CLASSES.items()}
    (root / 'metadata.yaml').write_text(yaml.safe_dump(meta, sort_keys=False))
    for c, per_split in lists.items():
        (root / c).mkdir(exist_ok=True)
        for split, names in per_split.items():
            (root / c / f'softras_{split}.lst').write_text(''.join(n + '\n' for n in names))
    _write_marker(root, 'nmr', seed, scenes)
    return WriteResult('nmr', root, root, scenes, num_images, image_bytes)


# ----------------------------------------------------------------------------- ObSuRF

def write_obsurf(out_dir, num_scenes: int, seed: int = 0, *, variant: str = 'clevr3d',
                 split_sizes: dict[str, int] | None = None, workers: int | None = None,
                 progress: Callable[[int], None] | None = None) -> WriteResult:
    """Write ``num_scenes`` ObSuRF-format scenes (``variant`` 'clevr3d' or 'msn') to ``out_dir``:
    scene i of a split is metadata row ``range start + i`` (see the module docstring)."""
    if variant not in OBSURF:
        raise ValueError(f'ObSuRF variant must be one of {sorted(OBSURF)}, got {variant!r}')
    fmt = 'obsurf' if variant == 'clevr3d' else 'obsurf-msn'
    _, slots, ranges = OBSURF[variant]
    root = pathlib.Path(out_dir)
    sizes = _resolve_splits(fmt, num_scenes, split_sizes)
    for split, n in sizes.items():
        lo, hi = ranges[split]
        if n > hi - lo:
            raise ValueError(f'{variant} split {split} holds at most {hi - lo} scenes '
                             f'(rows {lo}-{hi}), asked for {n}')
    meta = {'shape': np.ones((OBSURF_ROWS, slots), dtype=np.int64),  # unused rows: all slots full
            'camera_pos': np.zeros((OBSURF_ROWS, OBSURF_VIEWS, 3), dtype=np.float32),
            'color': np.zeros((OBSURF_ROWS, slots, 3), dtype=np.float32),
            'size': np.zeros((OBSURF_ROWS, slots), dtype=np.float32),
            'height': np.zeros((OBSURF_ROWS, slots), dtype=np.float32),
            '3d_coords': np.zeros((OBSURF_ROWS, slots, 3), dtype=np.float32),
            'rotation': np.zeros((OBSURF_ROWS, slots), dtype=np.float32)}
    tasks = _tasks(fmt, seed, sizes)
    (root / 'images').mkdir(parents=True, exist_ok=True)
    scenes = {s: [] for s in sizes}
    num_images = image_bytes = 0
    for (_, _, split, i), r in zip(tasks, _render_all(tasks, workers, progress)):
        row = ranges[split][0] + i
        for v, data in enumerate(r['pngs']):
            (root / 'images' / f'img_{row}_{v}.png').write_bytes(data)
            num_images += 1
            image_bytes += len(data)
        meta['camera_pos'][row] = r['camera_pos']
        n = len(r['objects']['shape'])
        if n > slots:
            raise AssertionError(f'scene with {n} objects does not fit {slots} slots')
        meta['shape'][row] = 0
        for k, v in r['objects'].items():
            meta[k][row, :n] = v
        scenes[split].append(str(row))
    save_npz(root / 'metadata.npz', meta, compress=True)
    _write_marker(root, fmt, seed, scenes, reader_max_objects=6 if variant == 'clevr3d' else 4)
    return WriteResult(fmt, root, root, scenes, num_images, image_bytes)


# ----------------------------------------------------------------------------- MSN (TFDS)

def msn_features(num_views: int = MSN_VIEWS, height: int = MSN_SIZE, width: int = MSN_SIZE,
                 labels=S.CATEGORY_NAMES):
    """The ``tfds.features.FeaturesDict`` of multi_shapenet_frames 2.3.3 as the test vector
    declares it (imports tensorflow_datasets)."""
    from pipeline.sources.msn import import_tensorflow
    import_tensorflow()
    import tensorflow_datasets as tfds
    F = tfds.features

    def rigid():
        return F.FeaturesDict({'R': F.Tensor(shape=(3, 3), dtype=np.float32),
                               't': F.Tensor(shape=(3,), dtype=np.float32)})

    def camera():
        return F.FeaturesDict({
            'category_image': F.LabeledImage(labels=list(labels), shape=(height, width, 1)),
            'color_image': F.Image(shape=(height, width, 3)),
            'extrinsics': rigid(),
            'intrinsics': F.FeaturesDict({
                'K': F.Tensor(shape=(3, 3), dtype=np.float32),
                'distortion': F.FeaturesDict({
                    'radial': F.Tensor(shape=(3,), dtype=np.float32),
                    'tangential': F.Tensor(shape=(2,), dtype=np.float32)}),
                'image_height': F.Tensor(shape=(), dtype=np.int32),
                'image_width': F.Tensor(shape=(), dtype=np.int32),
                'type': F.Text()}),
        })

    return F.FeaturesDict({
        'cameras': F.FeaturesDict({f'camera_{i}': camera() for i in range(num_views)}),
        'frame_name': F.Text(), 'pose': rigid(), 'scene_name': F.Text()})


def _msn_example(name: str, r: dict) -> dict:
    """The example dict of one rendered scene (PNG bytes pass through tfds' Image unchanged)."""
    cams = {}
    for i in range(MSN_VIEWS):
        cams[f'camera_{i}'] = {
            'category_image': r['category_pngs'][i], 'color_image': r['pngs'][i],
            'extrinsics': {'R': r['R'][i], 't': r['t'][i]},
            'intrinsics': {'K': r['K32'][i], 'image_height': np.int32(r['size']),
                           'image_width': np.int32(r['size']), 'type': 'PERSPECTIVE',
                           'distortion': {'radial': np.zeros(3, np.float32),
                                          'tangential': np.zeros(2, np.float32)}}}
    return {'cameras': cams, 'frame_name': name, 'scene_name': name,
            'pose': {'R': np.eye(3, dtype=np.float32), 't': np.zeros(3, np.float32)}}


def write_msn(out_dir, num_scenes: int, seed: int = 0, *, split_sizes: dict[str, int] | None = None,
              variant: str = 'msn',
              scenes_per_file: int = 256, workers: int | None = None,
              progress: Callable[[int], None] | None = None) -> WriteResult:
    """Write ``num_scenes`` MSN-format scenes as the TFDS dataset ``out_dir/multi_shapenet_frames/
    2.3.3`` (see the module docstring); each split in ceil(n / scenes_per_file) tfrecord files.
    Open it with ``tfds.builder_from_directory(result.dataset_dir)`` or
    ``sunds.builder('multi_shapenet', data_dir=result.root)``."""
    if scenes_per_file < 1:
        raise ValueError(f'scenes_per_file must be >= 1, got {scenes_per_file}')
    if variant not in _MSN_SIZES:
        raise ValueError(f'MSN variant must be one of {sorted(_MSN_SIZES)}, got {variant!r}')
    sizes = _resolve_splits(variant, num_scenes, split_sizes)
    tasks = _tasks(variant, seed, sizes)
    from pipeline.sources.msn import import_tensorflow
    tf = import_tensorflow()  # CPU only, loaded safely beside PyTorch
    from tensorflow_datasets.core import example_serializer

    root = pathlib.Path(out_dir)
    ds_dir = root / MSN_NAME / MSN_VERSION
    ds_dir.mkdir(parents=True, exist_ok=True)
    features = msn_features(height=_MSN_SIZES[variant], width=_MSN_SIZES[variant])
    features.save_config(str(ds_dir))  # features.json
    features.save_metadata(str(ds_dir))  # cameras-camera_<i>-category_image.labels.txt
    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    scenes = {s: [] for s in sizes}
    split_infos = []
    num_images = image_bytes = 0
    results = _render_all(tasks, workers, progress)  # spawned workers: safe beside TensorFlow
    try:
        for split, n in sizes.items():
            num_files = max(1, math.ceil(n / scenes_per_file))
            lengths, num_bytes = [], 0
            for j in range(num_files):
                count = (j + 1) * n // num_files - j * n // num_files  # balanced files
                path = ds_dir / f'{MSN_NAME}-{split}.tfrecord-{j:05d}-of-{num_files:05d}'
                with tf.io.TFRecordWriter(str(path)) as writer:
                    for r in itertools.islice(results, count):
                        name = f'scene_{MSN_SCENE_OFFSET[split] + len(scenes[split])}'
                        encoded = features.encode_example(_msn_example(name, r))
                        record = serializer.get_tf_example(encoded).SerializeToString(
                            deterministic=True)  # sorted feature map: same seed, same bytes
                        writer.write(record)
                        num_bytes += len(record)
                        num_images += len(r['pngs'])
                        image_bytes += sum(len(p) for p in r['pngs'])
                        scenes[split].append(name)
                lengths.append(str(count))
            # numBytes counts the serialized examples without the tfrecord framing, as tfds does
            split_infos.append({'filepathTemplate': '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}',
                                'name': split, 'numBytes': str(num_bytes), 'shardLengths': lengths})
    finally:
        results.close()  # stops the worker pool, also on errors
    info = {'fileFormat': 'tfrecord', 'moduleName': '__main__', 'name': MSN_NAME,
            'splits': split_infos, 'version': MSN_VERSION}
    (ds_dir / 'dataset_info.json').write_text(json.dumps(info, indent=2))
    _write_marker(root, variant, seed, scenes)
    return WriteResult(variant, root, ds_dir, scenes, num_images, image_bytes)


# ----------------------------------------------------------------------------- dispatch

def write_synthetic(fmt: str, out_dir, num_scenes: int, seed: int = 0, **kwargs) -> WriteResult:
    """Write ``num_scenes`` scenes in format ``fmt`` (one of FORMATS: 'msn', 'nmr', 'obsurf' =
    CLEVR3D, 'obsurf-msn' = ObSuRF-MSN); kwargs go to the writer (split_sizes, workers, progress,
    scenes_per_file for MSN)."""
    _check_format(fmt)
    if fmt == 'nmr':
        return write_nmr(out_dir, num_scenes, seed, **kwargs)
    if fmt in ('msn', 'msn-demo'):
        return write_msn(out_dir, num_scenes, seed, variant=fmt, **kwargs)
    return write_obsurf(out_dir, num_scenes, seed, variant='clevr3d' if fmt == 'obsurf' else 'msn',
                        **kwargs)

