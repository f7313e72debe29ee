"""DL3DV-10K-like nerfstudio captures (``--format dl3dv``): one capture per scene, laid out as
DL3DV's 960P download (``DIR/<subset>/<hash>/transforms.json`` + ``images_4/frame_NNNNN.png``).

What a real DL3DV capture has and this writer reproduces (docs/FORMATS: nerfstudio dataparser,
DL3DV-10K README and issues #4, #9, #18):

- ``transforms.json`` written as ``ns-process-data`` did before nerfstudio PR #2793: top-level
  ``w, h`` of the FULL-resolution video frames (``FULL_WIDTH x FULL_HEIGHT``), ``fl_x, fl_y, cx, cy``
  in full-resolution pixels, ``camera_model: OPENCV`` with non-zero ``k1, k2, p1, p2``, and
  ``applied_transform = [[0,1,0,0],[1,0,0,0],[0,0,-1,0]]`` (the pre-2024 value DL3DV files carry);
  ``frames[{file_path: "images/frame_NNNNN.png", transform_matrix}]`` listed in a shuffled order
  (nerfstudio sorts them by file name), each ``transform_matrix`` camera-to-world with OpenGL camera
  axes in the SAVED world ``= applied_transform @ COLMAP world``.
- Only ``images_4/`` (or ``images_<downscale>/``) exists, as in the 480P/960P downloads: images are
  ``floor(h / N) x floor(w / N)``; the full-resolution ``images/`` folder is absent.
- Images are rendered AS CAPTURED, i.e. distorted: pixel (row i, col j) of the stored image sees the
  ray of the normalised pinhole point ``undistort(((j + 0.5 - cx) / fx, (i + 0.5 - cy) / fy))``
  (nerfstudio's radial-tangential model, inverted exactly), so the true ray of every pixel is the one
  nerfstudio computes with the file's coefficients, and the pinhole part alone is ``K``, ``c2w``.

The renderer's world is the COLMAP world. Cameras walk along an arc around the scene (a handheld
capture's path), looking near its centre. ``dl3dv_capture(seed, index)`` gives every camera exactly.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import pathlib
from typing import Callable

import numpy as np
from PIL import Image

from pipeline import cameras as C
from pipeline.synthetic.common import WriteResult, png_bytes, render_all, write_marker
from pipeline.synthetic.raycast import render_rays
from pipeline.synthetic.scene import SPLIT_CODE, STREAM_CAMERAS, STREAM_NOISE, sample_scene, \
    scene_rng

FULL_WIDTH, FULL_HEIGHT = 384, 216  # the transforms.json w, h (16:9 like DL3DV's 3840 x 2160)
DOWNSCALE = 4  # the images_N folder written (960P-like)
DL3DV_VIEWS = 8
SUBSET = '1K'
# nerfstudio's ns-process-data before PR #2793 (and DL3DV's files): x, y swapped, z negated.
APPLIED_TRANSFORM = np.array([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0]])
OPENGL_FROM_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])  # camera axes: flip y and z
_STYLE = 'msn'  # textured ground, objects and sky


def distort(x: np.ndarray, y: np.ndarray, k: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """nerfstudio's perspective distortion of normalised pinhole coordinates (x, y) -> (xd, yd):
    ``d = 1 + r (k1 + r (k2 + r (k3 + r k4)))``, ``r = x^2 + y^2``, plus tangential p1, p2."""
    r = x * x + y * y
    d = 1.0 + r * (k['k1'] + r * (k['k2'] + r * (k['k3'] + r * k['k4'])))
    xd = x * d + 2.0 * k['p1'] * x * y + k['p2'] * (r + 2.0 * x * x)
    yd = y * d + 2.0 * k['p2'] * x * y + k['p1'] * (r + 2.0 * y * y)
    return xd, yd


def undistort_exact(xd: np.ndarray, yd: np.ndarray, k: dict[str, float]) -> tuple[np.ndarray,
                                                                                     np.ndarray]:
    """The inverse of ``distort`` to float64 precision (Newton with a numeric Jacobian, run until
    the residual is below 1e-14; the generator's ground truth, independent of any reader)."""
    x, y = xd.copy(), yd.copy()
    h = 1e-7
    for _ in range(50):
        fx, fy = distort(x, y, k)
        rx, ry = fx - xd, fy - yd
        if max(np.abs(rx).max(), np.abs(ry).max()) < 1e-14:
            break
        ax, ay = distort(x + h, y, k)
        bx, by = distort(x, y + h, k)
        j11, j21, j12, j22 = (ax - fx) / h, (ay - fy) / h, (bx - fx) / h, (by - fy) / h
        det = j11 * j22 - j12 * j21
        x, y = x - (j22 * rx - j12 * ry) / det, y - (j11 * ry - j21 * rx) / det
    return x, y


def capture_name(seed: int, index: int) -> str:
    """A DL3DV-style scene hash (64 hex digits), unique per (seed, index)."""
    return hashlib.sha256(f'srt-shards-dl3dv-{seed}-{index}'.encode()).hexdigest()


def dl3dv_capture(seed: int, index: int, num_views: int = DL3DV_VIEWS,
                  downscale: int = DOWNSCALE) -> dict:
    """The true cameras of capture ``index``, view v = file ``frame_{v+1:05d}`` (sorted order).

    'K_full' [3, 3] (pixels of the FULL_WIDTH x FULL_HEIGHT frames), 'K' [3, 3] (= K_full / N for
    the images_N files, last row kept), 'height', 'width' (of the images_N files), 'distortion'
    {k1, k2, k3, k4, p1, p2}, 'world_from_cam' [v, 4, 4] (OpenCV axes, renderer = COLMAP world),
    'saved_from_world' [4, 4] (applied_transform as 4x4), 'file_order' [v] (the view written at each
    position of the JSON's frames list).
    """
    rng = scene_rng(seed, 'train', index, STREAM_CAMERAS)
    focal = FULL_WIDTH * rng.uniform(0.75, 0.9)
    K_full = np.array([[focal, 0.0, FULL_WIDTH / 2 + rng.uniform(-4, 4)],
                       [0.0, focal * rng.uniform(0.995, 1.005), FULL_HEIGHT / 2 + rng.uniform(-3, 3)],
                       [0.0, 0.0, 1.0]])
    dist = {'k1': rng.uniform(-0.08, -0.03), 'k2': rng.uniform(0.005, 0.02), 'k3': 0.0, 'k4': 0.0,
            'p1': rng.uniform(-5e-4, 5e-4), 'p2': rng.uniform(-5e-4, 5e-4)}
    # A handheld walk: an arc of 60-100 degrees around the scene at 6.5-8 units, eye height
    # 1.2-2.2 with a little bob, looking at a point near the centre that drifts along.
    start = rng.uniform(0.0, 2 * math.pi)
    span = math.radians(rng.uniform(60.0, 100.0))
    radius, height = rng.uniform(6.5, 8.0), rng.uniform(1.2, 2.2)
    poses = []
    for v in range(num_views):
        a = start + span * v / max(num_views - 1, 1)
        eye = np.array([radius * math.cos(a), radius * math.sin(a),
                        height + 0.1 * math.sin(3.0 * a)])
        target = rng.normal(0.0, 0.3, 3) * (1.0, 1.0, 0.0) + (0.0, 0.0, 0.5)
        poses.append(C.look_at(eye, target))
    K = K_full.copy()
    K[:2] /= downscale
    saved_from_world = np.vstack([APPLIED_TRANSFORM, [0.0, 0.0, 0.0, 1.0]])
    return {'K_full': K_full, 'K': K, 'height': FULL_HEIGHT // downscale,
            'width': FULL_WIDTH // downscale, 'distortion': dist, 'world_from_cam': np.stack(poses),
            'saved_from_world': saved_from_world, 'file_order': rng.permutation(num_views)}


def capture_rays(cap: dict, v: int) -> tuple[np.ndarray, np.ndarray]:
    """The true rays of view v's stored (distorted) pixels: origin [3] and unit directions
    [h, w, 3] in the renderer's (COLMAP) world."""
    K, pose = cap['K'], cap['world_from_cam'][v]
    uv = C.pixel_centers(cap['height'], cap['width'])
    xu, yu = undistort_exact((uv[..., 0] - K[0, 2]) / K[0, 0], (uv[..., 1] - K[1, 2]) / K[1, 1],
                             cap['distortion'])
    d = np.stack([xu, yu, np.ones_like(xu)], -1) @ pose[:3, :3].T
    return pose[:3, 3].copy(), d / np.linalg.norm(d, axis=-1, keepdims=True)


def _encode(task: tuple[int, int, int, str]) -> dict:
    """Worker: render one capture's views (distorted) and encode them (module level: picklable)."""
    seed, index, downscale, image_format = task
    cap = dl3dv_capture(seed, index, downscale=downscale)
    scene = sample_scene(_STYLE, seed, 'train', index)
    images = []
    for v in range(len(cap['world_from_cam'])):
        origin, dirs = capture_rays(cap, v)
        out = render_rays(scene, origin, dirs.reshape(-1, 3))
        noise = np.random.default_rng(np.random.SeedSequence(
            [seed, SPLIT_CODE['train'], index, STREAM_NOISE + v])).normal(0.0, 2.0, (dirs.size,))
        rgb = np.clip(np.rint(out['radiance'].reshape(-1) * 255.0 + noise), 0, 255)
        rgb = rgb.astype(np.uint8).reshape(cap['height'], cap['width'], 3)
        images.append(png_bytes(rgb) if image_format == 'png' else _jpeg_bytes(rgb))
    return {'images': images, 'capture': cap}


def _jpeg_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format='JPEG', quality=90)
    return buf.getvalue()


def transforms_json(cap: dict, image_ext: str) -> dict:
    """The capture's transforms.json as DL3DV ships it (see the module docstring)."""
    K, d = cap['K_full'], cap['distortion']
    frames = []
    for v in cap['file_order']:
        # Saved pose: OpenCV -> OpenGL camera axes, then COLMAP world -> saved world.
        saved = cap['saved_from_world'] @ cap['world_from_cam'][v] @ OPENGL_FROM_OPENCV
        frames.append({'file_path': f'images/frame_{v + 1:05d}.{image_ext}',
                       'transform_matrix': saved.tolist(), 'colmap_im_id': int(v + 1)})
    return {'w': FULL_WIDTH, 'h': FULL_HEIGHT, 'fl_x': K[0, 0], 'fl_y': K[1, 1], 'cx': K[0, 2],
            'cy': K[1, 2], 'k1': d['k1'], 'k2': d['k2'], 'p1': d['p1'], 'p2': d['p2'],
            'camera_model': 'OPENCV', 'frames': frames,
            'applied_transform': APPLIED_TRANSFORM.tolist()}


def write_dl3dv(out_dir, num_scenes: int, seed: int = 0, *, downscale: int = DOWNSCALE,
                image_format: str = 'png', split_sizes: dict[str, int] | None = None,
                workers: int | None = None, progress: Callable[[int], None] | None = None
                ) -> WriteResult:
    """Write ``num_scenes`` DL3DV-like captures to ``out_dir/<SUBSET>/<hash>/`` (one split: the
    converter makes every capture a scene of one split). ``image_format`` 'png' (DL3DV) or 'jpeg'."""
    if image_format not in ('png', 'jpeg'):
        raise ValueError(f"image_format must be 'png' or 'jpeg', got {image_format!r}")
    if split_sizes is not None and set(split_sizes) - {'train'}:
        raise ValueError('dl3dv captures have no splits: pass split_sizes={"train": N} or none')
    root = pathlib.Path(out_dir)
    ext = 'png' if image_format == 'png' else 'jpg'
    tasks = [(seed, i, downscale, image_format) for i in range(num_scenes)]
    names, num_images, image_bytes = [], 0, 0
    for (_, i, _, _), r in zip(tasks, render_all(_encode, tasks, workers, progress)):
        scene_dir = root / SUBSET / capture_name(seed, i)
        (scene_dir / f'images_{downscale}').mkdir(parents=True, exist_ok=True)
        for v, data in enumerate(r['images']):
            (scene_dir / f'images_{downscale}' / f'frame_{v + 1:05d}.{ext}').write_bytes(data)
            num_images += 1
            image_bytes += len(data)
        (scene_dir / 'transforms.json').write_text(
            json.dumps(transforms_json(r['capture'], ext), indent=4) + '\n')
        names.append(f'{SUBSET}/{capture_name(seed, i)}')
    root.mkdir(parents=True, exist_ok=True)
    scenes = {'train': names}
    write_marker(root, 'dl3dv', seed, scenes, downscale=downscale, image_format=image_format)
    return WriteResult('dl3dv', root, root, scenes, num_images, image_bytes)
