"""What the synthetic writers share: the per-format table (views, image sizes, scene styles), the
cameras and renders of a format's scene, the process pool that renders and encodes scenes in order,
split sizes, deterministic npz files and the marker file.

Scene i of a split is scene (seed, split, i) (``pipeline.synthetic.scene``) in every format. Default
splits (``default_split_sizes``): 80/10/10 train/val/test (MSN: 90/10 train/test). Scenes are
rendered and PNG-encoded in worker processes (start method 'spawn', so a parent holding TensorFlow
state is safe); files are written in scene order by the parent, byte-identical for a given seed
whatever the number of workers.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import multiprocessing
import os
import pathlib
import zipfile
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from pipeline import cameras as C
from pipeline.schema import SYNTHETIC_MARKER
from pipeline.synthetic.raycast import render_views
from pipeline.synthetic.rigs import (msn_cameras, nmr_cameras, obsurf_camera_positions,
                                     ring_cameras, video_cameras)
from pipeline.synthetic.scene import (SPLITS, STREAM_CAMERAS, sample_scene, scene_rng,
                                      without_objects)

FORMATS = ('msn', 'nmr', 'obsurf', 'obsurf-msn', 'msn-demo', 'msn-hard', 'msn-hard-demo', 're10k',
           'lvsm', 'dl3dv', 'co3d')

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
# OSRT's MSN-Hard: sunds' KubricFrames builder (TFDS name kubric_frames, config
# multi_shapenet_conditional) version 2.8.0, stored in a multi_shapenet_frames/2.8.0 directory.
MSN_HARD_NAME, MSN_HARD_VERSION = 'kubric_frames', '2.8.0'
MSN_SCENE_OFFSET = {'train': 0, 'val': 400000, 'test': 500000}
# Video formats (pixelSplat chunks 're10k', LVSM scenes 'lvsm'): hand-held clips of 8-14 frames at
# 72x128, scene 1 of each split at 60x80 (the importers keep scenes of any size).
VIDEO_FORMATS = ('re10k', 'lvsm')
VIDEO_SIZE, VIDEO_ODD_SIZE, VIDEO_VIEWS = (72, 128), (60, 80), (8, 14)

_STYLE = {'nmr': 'nmr', 'obsurf': 'clevr', 'obsurf-msn': 'obsurf-msn', 'msn': 'msn',
          'msn-demo': 'demo', 'msn-hard': 'msn', 'msn-hard-demo': 'demo', 're10k': 'msn', 'lvsm': 'msn'}
# 'msn-demo': the MSN layout at 32x32 with the plain 'demo' scene style and a ring of cameras;
# 'msn-hard-demo': MSN-Hard at 64x64 with the 'demo' style on the MSN shell, closer (the toy OSRT run).
MSN_SIZES = {'msn': MSN_SIZE, 'msn-demo': 32, 'msn-hard': MSN_SIZE, 'msn-hard-demo': 64}
# Ring rigs (rigs.ring_cameras): distance, elevation (degrees) and height of the point looked at.
MSN_RINGS = {'msn-demo': (5.5, 30.0, 0.5)}
# Shell rigs (rigs.msn_cameras) closer than MSN's 9-13 units, so that few objects fill the images.
MSN_DISTANCES = {'msn-hard-demo': (6.5, 8.5)}
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



# ----------------------------------------------------------------------------- rendering

def default_split_sizes(fmt: str, num_scenes: int) -> dict[str, int]:
    """80/10/10 train/val/test (val and test get ceil(N / 10) each once N >= 3); MSN and the video
    formats: train/test 90/10 (test gets ceil(N / 10) once N >= 2); DL3DV-like captures: all in
    one split, train."""
    check_format(fmt)
    if num_scenes < 0:
        raise ValueError(f'num_scenes must be >= 0, got {num_scenes}')
    if fmt == 'dl3dv':
        return {'train': num_scenes}
    if fmt in tuple(MSN_SIZES) + VIDEO_FORMATS:
        m = math.ceil(num_scenes / 10) if num_scenes >= 2 else 0
        return {'train': num_scenes - m, 'test': m}
    m = math.ceil(num_scenes / 10) if num_scenes >= 3 else 0
    return {'train': num_scenes - 2 * m, 'val': m, 'test': m}


def video_size(index: int) -> tuple[int, int]:
    """(height, width) of scene ``index`` of a video format."""
    return VIDEO_ODD_SIZE if index == 1 else VIDEO_SIZE


def _video_cameras(fmt: str, rng, index: int, views: tuple[int, int] | None) -> dict:
    """Cameras as the video formats store them, and the float64 cameras those values define."""
    lo, hi = views or VIDEO_VIEWS
    n = int(rng.integers(lo, hi + 1))
    h, w = video_size(index)
    K, poses = video_cameras(rng, n, h, w)
    cam_from_world = np.linalg.inv(poses)
    if fmt == 'lvsm':  # JSON floats: pixels and the 4x4 w2c, exactly
        fxfycxcy = K[:, [0, 1, 0, 1], [0, 1, 2, 2]]
        return {'K': K, 'world_from_cam': np.linalg.inv(cam_from_world), 'fxfycxcy': fxfycxcy,
                'w2c': cam_from_world, 'size': (h, w)}
    # pixelSplat rows: float32 [fx/W, fy/H, cx/W, cy/H, 0, 0, w2c 3x4]; rendered from those values
    rows = np.zeros((n, 18), np.float32)
    rows[:, :4] = K[:, [0, 1, 0, 1], [0, 1, 2, 2]] / np.array([w, h, w, h])
    rows[:, 6:] = cam_from_world[:, :3].reshape(n, 12)
    r = rows.astype(np.float64)
    K32 = np.zeros((n, 3, 3))
    K32[:, 0, 0], K32[:, 1, 1], K32[:, 0, 2], K32[:, 1, 2] = r[:, 0] * w, r[:, 1] * h, r[:, 2] * w, \
        r[:, 3] * h
    K32[:, 2, 2] = 1.0
    w2c = np.broadcast_to(np.eye(4), (n, 4, 4)).copy()
    w2c[:, :3] = r[:, 6:].reshape(n, 3, 4)
    return {'K': K32, 'world_from_cam': np.linalg.inv(w2c), 'rows': rows, 'size': (h, w)}


def scene_cameras(fmt: str, seed: int, split: str, index: int,
                  views: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """The cameras of scene ``index`` of ``split`` exactly as rendered and stored.

    Always 'K' [v, 3, 3] and 'world_from_cam' [v, 4, 4] (float64; what the renderer used). ObSuRF
    also 'camera_pos' [v, 3] float32 (stored; the cameras are built from these rounded values);
    MSN also 'K32', 'R', 't' float32 (stored intrinsics and camera_from_world extrinsics, the
    rendering cameras are built from them); NMR also 'nmr': the four DVR matrices per view. Video
    formats (``views``: the range of frame counts, default VIDEO_VIEWS): 'size' (h, w) and 'rows'
    [v, 18] float32 (pixelSplat) or 'fxfycxcy' [v, 4] and 'w2c' [v, 4, 4] (LVSM).
    """
    check_format(fmt)
    rng = scene_rng(seed, split, index, STREAM_CAMERAS)
    if fmt in VIDEO_FORMATS:
        return _video_cameras(fmt, rng, index, views)
    if fmt == 'nmr':
        K, poses = nmr_cameras(rng, NMR_VIEWS, NMR_SIZE, NMR_SIZE)
        mats = [C.opencv_to_nmr(K[i], poses[i], NMR_SIZE, NMR_SIZE) for i in range(NMR_VIEWS)]
        # exact zeros where DVR has them (the inverses leave ~1e-17 residue)
        mats = [{k: np.where(np.abs(v) < 1e-12, 0.0, v) for k, v in m.items()} for m in mats]
        return {'K': K, 'world_from_cam': poses, 'nmr': mats}
    if fmt in ('obsurf', 'obsurf-msn'):
        pos = obsurf_camera_positions(rng, OBSURF_VIEWS).astype(np.float32)
        cams = [C.obsurf_to_opencv(p.astype(np.float64), OBSURF_HEIGHT, OBSURF_WIDTH) for p in pos]
        return {'K': np.stack([c[0] for c in cams]),
                'world_from_cam': np.stack([c[1] for c in cams]), 'camera_pos': pos}
    size = MSN_SIZES[fmt]
    if fmt in MSN_RINGS:  # the demo: a ring close to its few central objects
        d, el, tz = MSN_RINGS[fmt]
        K, poses = ring_cameras(rng, MSN_VIEWS, size, size, d, el, tz)
    elif fmt in MSN_DISTANCES:
        K, poses = msn_cameras(rng, MSN_VIEWS, size, size, distance=MSN_DISTANCES[fmt])
    else:
        K, poses = msn_cameras(rng, MSN_VIEWS, size, size)
    Rt = [C.opencv_to_sunds(p) for p in poses]
    R = np.stack([r for r, _ in Rt]).astype(np.float32)
    t = np.stack([t for _, t in Rt]).astype(np.float32)
    K32 = K.astype(np.float32)
    world_from_cam = np.stack([C.sunds_to_opencv(K32[i], R[i], t[i])[1] for i in range(MSN_VIEWS)])
    return {'K': K32.astype(np.float64), 'world_from_cam': world_from_cam, 'K32': K32, 'R': R,
            't': t}


def render_scene(fmt: str, seed: int, split: str, index: int, *, noise: bool = True,
                 views: tuple[int, int] | None = None, objects: bool = True) -> dict:
    """Scene ``index`` of ``split`` as the writer of ``fmt`` renders it: 'scene' (``scene.Scene``), the
    ``scene_cameras`` entries, and the stacked ``raycast.render`` outputs 'rgb' [v, h, w, 3], 'depth',
    'object_id', 'category' [v, h, w]. ``noise=False`` renders without the per-pixel noise;
    ``objects=False`` renders the scene with its objects removed (``scene.without_objects``: ground
    and sky exactly as in the stored views, no objects and no shadows), the object-blind baseline."""
    cams = scene_cameras(fmt, seed, split, index, views)
    scene = sample_scene(_STYLE[fmt], seed, split, index)
    if not objects:
        scene = without_objects(scene)
    h, w = cams['size'] if 'size' in cams else \
        ((NMR_SIZE, NMR_SIZE) if fmt == 'nmr' else (MSN_SIZES[fmt],) * 2 if fmt in MSN_SIZES
         else (OBSURF_HEIGHT, OBSURF_WIDTH))
    views = render_views(scene, cams['K'], cams['world_from_cam'], h, w, noise=noise, seed=seed,
                           split=split, index=index)
    return {'scene': scene, **cams, **views}


def msn_scene_index(name: str, split: str) -> int:
    """The generator's scene index of MSN scene ``name`` ('scene_<n>', numbered from
    ``MSN_SCENE_OFFSET[split]``) of ``split``."""
    prefix = 'scene_'
    if not name.startswith(prefix) or not name[len(prefix):].isdigit():
        raise ValueError(f'{name!r} is not a generated MSN scene name (scene_<n>)')
    if split not in MSN_SCENE_OFFSET:
        raise ValueError(f'{name!r}: unknown MSN split {split!r} (one of {sorted(MSN_SCENE_OFFSET)})')
    index = int(name[len(prefix):]) - MSN_SCENE_OFFSET[split]
    if index < 0:
        raise ValueError(f'{name!r} is not a scene of split {split!r} (numbers from '
                         f'{MSN_SCENE_OFFSET[split]})')
    return index


def png_bytes(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 image [h, w] or [h, w, c] (PIL, default compression; deterministic)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format='PNG')
    return buf.getvalue()


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


def render_all(encode: Callable[[tuple], dict], tasks: list, workers: int | None,
               progress: Callable[[int], None] | None) -> Iterator[dict]:
    """``encode(task)`` of every task, in order, in ``workers`` spawned processes (in this process
    if workers <= 1); ``encode`` is a writer's module-level (picklable) render-and-encode function."""
    workers = _default_workers() if workers is None else workers
    workers = max(1, min(workers, len(tasks)))
    if workers == 1:
        for task in tasks:
            yield encode(task)
            if progress:
                progress(1)
        return
    with _single_threaded_blas():
        pool = multiprocessing.get_context('spawn').Pool(workers)
    with pool:
        for result in pool.imap(encode, tasks, chunksize=2):
            yield result
            if progress:
                progress(1)


# ----------------------------------------------------------------------------- helpers

def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f'unknown format {fmt!r}; expected one of {FORMATS}')


def resolve_splits(fmt: str, num_scenes: int, split_sizes: dict[str, int] | None
                   ) -> dict[str, int]:
    sizes = default_split_sizes(fmt, num_scenes) if split_sizes is None else dict(split_sizes)
    for split, n in sizes.items():
        if split not in SPLITS:
            raise ValueError(f'unknown split {split!r} in split_sizes; expected one of {SPLITS}')
        if n < 0:
            raise ValueError(f'split_sizes[{split!r}] must be >= 0, got {n}')
    if split_sizes is not None and sum(sizes.values()) != num_scenes:
        raise ValueError(f'split_sizes {sizes} add up to {sum(sizes.values())}, not num_scenes '
                         f'= {num_scenes}')
    return {s: sizes[s] for s in SPLITS if s in sizes}  # train, val, test order


def tasks_of(fmt: str, seed: int, sizes: dict[str, int]) -> list[tuple[str, int, str, int]]:
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


def write_marker(root: pathlib.Path, fmt: str, seed: int, scenes: dict[str, list[str]],
                 **extra) -> None:
    # 'generator' keeps the module name of earlier versions: the same seed still gives the same bytes
    info = {'generator': 'srt-shards pipeline.synthetic_writers', 'format': fmt, 'seed': seed,
            'num_scenes': sum(len(v) for v in scenes.values()),
            'splits': {s: len(v) for s, v in scenes.items()}, **extra}
    (root / SYNTHETIC_MARKER).write_text(json.dumps(info, indent=2) + '\n')

