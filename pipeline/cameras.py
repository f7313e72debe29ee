"""Camera geometry: the one camera convention of the whole project (see docs/CONVENTIONS.md).

Per view:
- ``K`` [3, 3]: intrinsics in pixels. The pixel in row ``v``, column ``u`` has its centre at image
  coordinates ``(u + 0.5, v + 0.5)``; the image's top-left corner is ``(0, 0)``::

      K = [[fx, s,  cx],
           [0,  fy, cy],
           [0,  0,  1 ]]

- ``world_from_cam`` [4, 4]: camera-to-world pose with OpenCV camera axes
  (x right, y down, z forward). Its rotation is proper (det +1).
- A ray starts at the camera centre ``world_from_cam[:3, 3]`` with direction
  ``normalise(R @ inv(K) @ [u + 0.5, v + 0.5, 1])``, ``R = world_from_cam[:3, :3]``.

Transforms are named ``b_from_a`` (maps coordinates in frame a to frame b), so that compositions read
right: ``c_from_a = c_from_b @ b_from_a``. World units are those of the source dataset.

The source converters (``*_to_opencv``) express each dataset's own camera description in this
convention such that the rays equal the reference loaders' rays; the canonical-frame functions
reproduce the reference's per-dataset canonical frames.

All functions here are pure numpy (float64 inside). ``image_rays_torch`` and
``transform_points_torch`` are the torch twins the trainer uses on its device.
"""
from __future__ import annotations

import functools

import numpy as np

UP_Z = np.array([0.0, 0.0, 1.0])

# NMR's fixed world rotation (x, y, z) -> (x, -z, y), applied on the world side of its cameras
# by the reference loader so that z = 0 is the ground plane as in the other datasets.
NMR_WORLD_ROTATION = np.array([[1.0, 0.0, 0.0, 0.0],
                               [0.0, 0.0, -1.0, 0.0],
                               [0.0, 1.0, 0.0, 0.0],
                               [0.0, 0.0, 0.0, 1.0]])


# ----------------------------------------------------------------------------- validation

_LAST_ROW_K, _LAST_ROW_POSE, _EYE3 = np.array([0.0, 0.0, 1.0]), np.array([0.0, 0.0, 0.0, 1.0]), np.eye(3)

def _as_matrix(x, shape: tuple[int, int], name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim < 2 or a.shape[-2:] != shape:
        raise ValueError(f'{name} must have shape [..., {shape[0]}, {shape[1]}], got {list(a.shape)}')
    if not np.isfinite(a).all():
        raise ValueError(f'{name} has non-finite values (nan or inf)')
    return a


def check_intrinsics(K) -> np.ndarray:
    """Validate intrinsics ``K`` [..., 3, 3] (pixels) and return them as float64.

    Raises ValueError for a wrong shape, non-finite values, a last row other than (0, 0, 1) or a
    singular matrix.
    """
    K = _as_matrix(K, (3, 3), 'intrinsics K')
    if np.abs(K[..., 2, :] - _LAST_ROW_K).max() > 1e-6:
        raise ValueError(f'intrinsics K must have last row (0, 0, 1), got {K[..., 2, :].tolist()}')
    if np.any(np.abs(np.linalg.det(K)) < 1e-12):
        raise ValueError('intrinsics K is singular (zero focal length?)')
    return K


def check_pose(world_from_cam, name: str = 'world_from_cam') -> np.ndarray:
    """Validate a rigid pose [..., 4, 4] (or [..., 3, 4]) and return it as float64 [..., 4, 4].

    The rotation block must be orthonormal with det +1 (to 1e-4), the last row (0, 0, 0, 1).
    """
    a = np.asarray(world_from_cam, dtype=np.float64)
    if a.ndim >= 2 and a.shape[-2:] == (3, 4):
        bottom = np.broadcast_to([0.0, 0.0, 0.0, 1.0], a.shape[:-2] + (1, 4))
        a = np.concatenate([a, bottom], axis=-2)
    a = _as_matrix(a, (4, 4), name)
    if np.abs(a[..., 3, :] - _LAST_ROW_POSE).max() > 1e-6:
        raise ValueError(f'{name} must have last row (0, 0, 0, 1), got {a[..., 3, :].tolist()}')
    R = a[..., :3, :3]
    det = np.linalg.det(R)
    if np.any(np.abs(det) < 1e-12):
        raise ValueError(f'{name} has a singular rotation block')
    err = np.abs(np.swapaxes(R, -1, -2) @ R - _EYE3).max()
    if err > 1e-4:
        raise ValueError(f'{name} rotation block is not orthonormal (max |R^T R - I| = {err:.2e})')
    if np.any(det < 0):
        raise ValueError(f'{name} rotation has det -1 (a reflection, not an OpenCV pose)')
    return a


def _normalise(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- rays

def pixel_centers(height: int, width: int) -> np.ndarray:
    """Image coordinates of all pixel centres, [h, w, 2] float64 as (u + 0.5, v + 0.5).

    >>> pixel_centers(2, 3)[1, 2].tolist()
    [2.5, 1.5]
    """
    u, v = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    return np.stack([u, v], axis=-1) + 0.5


def rays_from_image_points(K, world_from_cam, points) -> tuple[np.ndarray, np.ndarray]:
    """Rays through image points ``points`` [..., n..., 2] (image coordinates, pixel centres at +0.5).

    ``K`` [..., 3, 3] and ``world_from_cam`` [..., 4, 4] broadcast against the leading dimensions
    of ``points`` minus its point dimensions; pass one camera with points of any shape [*p, 2].
    Returns (origins, directions), each [*p, 3] float64 in world coordinates, directions unit length.
    """
    K = check_intrinsics(K)
    pose = check_pose(world_from_cam)
    points = np.asarray(points, dtype=np.float64)
    if points.shape[-1] != 2:
        raise ValueError(f'image points must have shape [..., 2], got {list(points.shape)}')
    if K.ndim != 2 or pose.ndim != 2:
        raise ValueError('rays_from_image_points takes a single camera; use image_rays for batches')
    homog = np.concatenate([points, np.ones_like(points[..., :1])], axis=-1)
    cam_from_image = np.linalg.inv(K)
    world_from_image = pose[:3, :3] @ cam_from_image  # direction up to scale, [3, 3]
    directions = _normalise(homog @ world_from_image.T)
    origins = np.broadcast_to(pose[:3, 3], directions.shape).copy()
    return origins, directions


def pixel_rays(K, world_from_cam, rows, cols) -> tuple[np.ndarray, np.ndarray]:
    """Rays through the centres of the pixels at integer (rows, cols) (any equal shapes [*p])."""
    rows = np.asarray(rows)
    cols = np.asarray(cols)
    if rows.shape != cols.shape:
        raise ValueError(f'rows and cols must have the same shape, got {rows.shape} and {cols.shape}')
    points = np.stack([cols, rows], axis=-1).astype(np.float64) + 0.5
    return rays_from_image_points(K, world_from_cam, points)


def image_rays(K, world_from_cam, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Rays through every pixel centre of a batch of cameras.

    K [..., 3, 3] and world_from_cam [..., 4, 4] with the same leading shape [*b].
    Returns (origins, directions) [*b, h, w, 3] float64; row-major pixels (row v, column u).
    """
    K = check_intrinsics(K)
    pose = check_pose(world_from_cam)
    if K.shape[:-2] != pose.shape[:-2]:
        raise ValueError(f'K batch shape {K.shape[:-2]} != pose batch shape {pose.shape[:-2]}')
    grid = pixel_centers(height, width)
    homog = np.concatenate([grid, np.ones((height, width, 1))], axis=-1)  # [h, w, 3]
    world_from_image = pose[..., :3, :3] @ np.linalg.inv(K)  # [*b, 3, 3]
    directions = np.einsum('...ij,hwj->...hwi', world_from_image, homog)
    directions = _normalise(directions)
    origins = np.broadcast_to(pose[..., None, None, :3, 3], directions.shape).copy()
    return origins, directions


# ----------------------------------------------------------------------------- transforms

def invert_pose(b_from_a, checked: bool = False) -> np.ndarray:
    """Inverse of a rigid transform [..., 4, 4]: returns a_from_b (exact rigid inverse R^T, -R^T t).
    ``checked``: the pose is a float64 array that ``check_pose`` already passed (skip it)."""
    T = b_from_a if checked else check_pose(b_from_a, 'pose')
    R = T[..., :3, :3]
    t = T[..., :3, 3]
    out = np.zeros_like(T)
    Rt = np.swapaxes(R, -1, -2)
    out[..., :3, :3] = Rt
    out[..., :3, 3] = -np.einsum('...ij,...j->...i', Rt, t)
    out[..., 3, 3] = 1.0
    return out


def transform_points(points, b_from_a) -> np.ndarray:
    """Map points [..., 3] from frame a to frame b with b_from_a [4, 4] (or [3, 4])."""
    T = np.asarray(b_from_a, dtype=np.float64)
    return np.asarray(points) @ T[:3, :3].T + T[:3, 3]


def transform_directions(directions, b_from_a) -> np.ndarray:
    """Rotate directions [..., 3] from frame a to frame b (no translation)."""
    T = np.asarray(b_from_a, dtype=np.float64)
    return np.asarray(directions) @ T[:3, :3].T


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a x b of two 3-vectors (np.cross costs ~8x more on single vectors; this is per item)."""
    return np.array([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


def _level_axes(z: np.ndarray, up: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Camera x = normalise(z x up) (horizontal, to the right) and y = z x x (down) for a unit
    viewing direction z."""
    x = _cross(z, up)
    norm = np.linalg.norm(x)
    if norm < 1e-9:
        raise ValueError(f'{what}: viewing direction is parallel to the up axis')
    x = x / norm
    return x, _cross(z, x)


def look_at(eye, target=(0.0, 0.0, 0.0), up=UP_Z) -> np.ndarray:
    """OpenCV world_from_cam [4, 4] of a level camera at ``eye`` looking at ``target``.

    z = normalise(target - eye); x = normalise(z x up) (horizontal, to the right);
    y = z x x (downwards in the image). This is the frame of ObSuRF's cameras and of the
    reference's ``get_extrinsic`` (whose matrix is the inverse of this one).
    """
    eye = np.asarray(eye, dtype=np.float64)
    z = _normalise(np.asarray(target, dtype=np.float64) - eye)
    x, y = _level_axes(z, np.asarray(up, dtype=np.float64), 'look_at')
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = x, y, z, eye
    return pose


# ----------------------------------------------------------------------------- sources -> K + pose

def _edge_grid_matrix(height: int, width: int) -> np.ndarray:
    """[3, 3] map from pixel-centre coordinates (u + .5, v + .5, 1) to NMR's edge-to-edge grid.

    NMR's reference samples x = linspace(-1, 1, W)[u] = 2u / (W - 1) - 1, i.e. the first and last
    pixel centres sit on the image edges -1 and +1; with u = (u + .5) - .5 that is affine in the
    pixel centre.
    """
    ax, ay = 2.0 / (width - 1), 2.0 / (height - 1)
    return np.array([[ax, 0.0, -0.5 * ax - 1.0],
                     [0.0, ay, -0.5 * ay - 1.0],
                     [0.0, 0.0, 1.0]])


def nmr_to_opencv(world_mat_inv, camera_mat_inv, height: int, width: int):
    """NMR (DVR) camera -> (K [3, 3], world_from_cam [4, 4]) in the rotated NMR world.

    The reference ray of pixel (v, u) is normalise(rot @ world_mat_inv @ camera_mat_inv
    @ [x_u, y_v, 1, 0]) with x, y on edge-to-edge linspace(-1, 1) grids. DVR's camera frame has x
    along columns, y along rows, z forward: already OpenCV axes, so world_from_cam is the rotated
    world_mat_inv and K absorbs camera_mat_inv and the edge-to-edge grid.
    """
    wmi = check_pose(world_mat_inv, 'NMR world_mat_inv')
    cmi = _as_matrix(camera_mat_inv, (4, 4), 'NMR camera_mat_inv')
    cam_from_image = cmi[:3, :3] @ _edge_grid_matrix(height, width)
    K = np.linalg.inv(cam_from_image)
    K = K / K[2, 2]
    return check_intrinsics(K), NMR_WORLD_ROTATION @ wmi


def opencv_to_nmr(K, world_from_cam, height: int, width: int) -> dict[str, np.ndarray]:
    """Inverse of nmr_to_opencv: DVR's four matrices for one view (world_mat, camera_mat, inverses)."""
    K = check_intrinsics(K)
    pose = check_pose(world_from_cam)
    world_mat_inv = NMR_WORLD_ROTATION.T @ pose
    cam_from_image = np.linalg.inv(K) @ np.linalg.inv(_edge_grid_matrix(height, width))
    camera_mat_inv = np.eye(4)
    camera_mat_inv[:3, :3] = cam_from_image
    return {'world_mat': invert_pose(world_mat_inv), 'camera_mat': np.linalg.inv(camera_mat_inv),
            'world_mat_inv': world_mat_inv, 'camera_mat_inv': camera_mat_inv}


def obsurf_intrinsics(height: int, width: int, focal_length: float = 0.035,
                      sensor_width: float = 0.032) -> np.ndarray:
    """K of ObSuRF's pinhole: sensor ``sensor_width`` wide (metres), square pixels, centred.

    The reference places pixel centres at (2u + 1) / W - 1 of the half sensor width, so
    fx = fy = W * focal / sensor_width and the principal point is the image centre.
    """
    f_px = width * focal_length / sensor_width
    return np.array([[f_px, 0.0, width / 2.0], [0.0, f_px, height / 2.0], [0.0, 0.0, 1.0]])


def obsurf_to_opencv(camera_pos, height: int = 240, width: int = 320, focal_length: float = 0.035,
                     sensor_width: float = 0.032, track_point=(0.0, 0.0, 0.0)):
    """ObSuRF camera (a position looking at the origin, z up) -> (K, world_from_cam)."""
    pos = _as_vector(camera_pos, 'ObSuRF camera_pos')
    return obsurf_intrinsics(height, width, focal_length, sensor_width), look_at(pos, track_point)


def sunds_to_opencv(K, extrinsics_R, extrinsics_t, pose_R=np.eye(3), pose_t=np.zeros(3)):
    """sunds camera(s) -> (K, world_from_cam); world = sunds' scene frame.

    sunds stores ``extrinsics`` as camera_from_frame ([R | t], OpenCV axes) and the frame ``pose`` as
    scene_from_frame, so scene_from_camera = scene_from_frame @ inverse(camera_from_frame). Its K
    already uses pixel centres at +0.5. K [..., 3, 3], R [..., 3, 3], t [..., 3] for one camera or
    a stack of them (one frame pose).
    """
    camera_from_frame = _rigid(extrinsics_R, extrinsics_t, 'sunds extrinsics')
    scene_from_frame = _rigid(pose_R, pose_t, 'sunds frame pose')
    return check_intrinsics(K), scene_from_frame @ invert_pose(camera_from_frame)


def opencv_to_sunds(world_from_cam) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of sunds_to_opencv with an identity frame pose: extrinsics (R, t) = camera_from_world."""
    cam_from_world = invert_pose(world_from_cam)
    return cam_from_world[:3, :3], cam_from_world[:3, 3]


def _as_vector(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.shape != (3,):
        raise ValueError(f'{name} must have shape [3], got {list(a.shape)}')
    if not np.all(np.isfinite(a)):
        raise ValueError(f'{name} has non-finite values (nan or inf)')
    return a


def _rigid(R, t, name: str) -> np.ndarray:
    """[..., 4, 4] from rotations [..., 3, 3] and translations [..., 3], validated."""
    R = _as_matrix(R, (3, 3), f'{name} R')
    t = np.asarray(t, dtype=np.float64)
    if t.shape != R.shape[:-1]:
        raise ValueError(f'{name} t must have shape {list(R.shape[:-1])}, got {list(t.shape)}')
    if not np.isfinite(t).all():
        raise ValueError(f'{name} t has non-finite values (nan or inf)')
    T = np.zeros(R.shape[:-2] + (4, 4))
    T[..., :3, :3] = R
    T[..., :3, 3] = t
    T[..., 3, 3] = 1.0
    return check_pose(T, name)


# ----------------------------------------------------------------------------- canonical frames

CANONICAL_RULES = ('input_view_pose', 'look_at_origin', 'center_columns_rays')


def canonical_from_look_at(camera_pos, track_point=(0.0, 0.0, 0.0), up=UP_Z) -> np.ndarray:
    """canonical_from_world [4, 4] of a camera at ``camera_pos`` looking at ``track_point``, z up.

    The reference's ``get_extrinsic`` with a track point: rows x = normalise(z x up), y = z x x,
    z = normalise(track - pos); translation -R @ pos. (ObSuRF's rule, with the origin as track point.)
    """
    return invert_pose(look_at(_as_vector(camera_pos, 'camera_pos'), track_point, up))


def canonical_from_rays(camera_pos, directions, up=UP_Z) -> np.ndarray:
    """canonical_from_world [4, 4] from a view's rays [h, w, 3], as the reference's MSN loader does.

    The reference's ``get_extrinsic`` takes z = normalise(mean of the rays of *all rows* of the
    centre column(s): the two middle columns for even w, the middle one for odd w (its row slice
    is overwritten by the column slice)); x = normalise(z x up); y = z x x; translation -R @ pos.
    """
    d = np.asarray(directions, dtype=np.float64)
    if d.ndim != 3 or d.shape[-1] != 3:
        raise ValueError(f'rays must have shape [h, w, 3], got {list(d.shape)}')
    w = d.shape[1]
    cols = slice(w // 2 - 1, w // 2 + 1) if w % 2 == 0 else slice(w // 2, w // 2 + 1)
    z = _normalise(d[:, cols].mean(axis=(0, 1)))
    pos = _as_vector(camera_pos, 'camera_pos')
    return canonical_from_look_at(pos, pos + z, up)


@functools.lru_cache(maxsize=16)
def _center_column_points(height: int, width: int) -> np.ndarray:
    """Homogeneous image points [2h (h for odd w), 3] of the centre column(s)' pixel centres (read
    only: cached)."""
    cols = np.arange(width // 2 - 1, width // 2 + 1) if width % 2 == 0 else np.array([width // 2])
    rr, cc = np.meshgrid(np.arange(height), cols, indexing='ij')
    points = np.stack([cc + 0.5, rr + 0.5, np.ones(rr.shape)], axis=-1).reshape(-1, 3)
    points.flags.writeable = False
    return points


def canonical_from_world(rule: str, K, world_from_cam, height: int, width: int,
                         checked: bool = False) -> np.ndarray:
    """The reference's canonical frame of the input view with pose ``world_from_cam`` [4, 4].

    rule 'input_view_pose' (NMR): the input view's (rotated) world_mat = inverse(world_from_cam);
    'look_at_origin' (ObSuRF): a level camera at the input camera's position looking at the origin;
    'center_columns_rays' (MSN): ``canonical_from_rays`` of the input view's rays. ``checked``: K
    and the pose are float64 arrays that ``check_intrinsics`` / ``check_pose`` already passed (a
    ``pipeline.reader.Scene``'s cameras: this runs per training item).
    """
    pose = world_from_cam if checked else check_pose(world_from_cam)
    if rule == 'input_view_pose':
        return invert_pose(pose, checked=True)
    if rule == 'look_at_origin':
        return canonical_from_look_at(pose[:3, 3])
    if rule == 'center_columns_rays':
        # canonical_from_rays(pose[:3, 3], the view's rays), from the centre columns' rays only and
        # with the camera validated once (this runs per training item).
        K = K if checked else check_intrinsics(K)
        points = _center_column_points(height, width)
        d = _normalise(points @ (pose[:3, :3] @ np.linalg.inv(K)).T)
        # The reference averages float32 rays; rounding the directions first matches it closer.
        z = _normalise(d.astype(np.float32).astype(np.float64).mean(axis=0))
        x, y = _level_axes(z, UP_Z, 'canonical frame')
        R = np.stack([x, y, z])  # rows: the canonical axes (invert_pose of look_at, unchecked)
        out = np.eye(4)
        out[:3, :3] = R
        out[:3, 3] = -R @ pose[:3, 3]
        return out
    raise ValueError(f'unknown canonical-frame rule {rule!r}; expected one of {CANONICAL_RULES}')


# ----------------------------------------------------------------------------- torch twins

def image_rays_torch(K: 'torch.Tensor', world_from_cam: 'torch.Tensor', height: int,
                     width: int) -> 'torch.Tensor':
    """Torch twin of ``image_rays`` directions: K [..., 3, 3], pose [..., 4, 4] -> [..., h, w, 3].

    No validation (it runs inside the training step); origins are ``world_from_cam[..., :3, 3]``.
    """
    import torch  # the converters and other pure-numpy users never pay for importing torch
    dtype, device = world_from_cam.dtype, world_from_cam.device
    v, u = torch.meshgrid(torch.arange(height, dtype=dtype, device=device) + 0.5,
                          torch.arange(width, dtype=dtype, device=device) + 0.5, indexing='ij')
    homog = torch.stack([u, v, torch.ones_like(u)], dim=-1)  # [h, w, 3]
    world_from_image = world_from_cam[..., :3, :3] @ torch.linalg.inv(K)
    d = torch.einsum('...ij,hwj->...hwi', world_from_image, homog)
    return d / d.norm(dim=-1, keepdim=True)


def transform_points_torch(points: 'torch.Tensor', b_from_a: 'torch.Tensor',
                           translate: bool = True) -> 'torch.Tensor':
    """Map points (or directions with translate=False) [..., n, 3] with b_from_a [..., 4, 4]."""
    out = points @ b_from_a[..., :3, :3].transpose(-1, -2)
    if translate:
        out = out + b_from_a[..., None, :3, 3]
    return out
