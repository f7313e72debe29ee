"""Camera rigs of the synthetic datasets, as the real datasets place their cameras: DVR's circle
(NMR), ObSuRF's look-at-origin positions and MultiShapeNet's half-sphere shell, and the demo's
NMR-like ring (``ring_cameras``). Cameras are K
[v, 3, 3] in pixels and world_from_cam [v, 4, 4] with OpenCV axes (``pipeline.cameras``), z up."""
from __future__ import annotations

import math

import numpy as np

from pipeline import cameras as C

NMR_FOCAL = 2.17505728  # DVR's camera_mat diag(f, f, 1, 1) (normalised image coordinates)


def nmr_intrinsics(height: int = 64, width: int = 64, focal: float = NMR_FOCAL) -> np.ndarray:
    """K [3, 3] (pixels) whose NMR encoding (``cameras.opencv_to_nmr``) has camera_mat
    diag(f, f, 1, 1).

    The reference maps x = linspace(-1, 1, W)[u] = a (u + 0.5) + b with a = 2 / (W - 1),
    b = -a / 2 - 1, then divides by f; inverting gives fx = f / a and cx = -b / a.
    """
    ax, ay = 2.0 / (width - 1), 2.0 / (height - 1)
    return np.array([[focal / ax, 0.0, (1.0 + ax / 2) / ax],
                     [0.0, focal / ay, (1.0 + ay / 2) / ay],
                     [0.0, 0.0, 1.0]])


def nmr_cameras(rng, num_views: int = 24, height: int = 64, width: int = 64,
                distance: tuple[float, float] = (2.5, 2.9), elevation_deg: float = 30.0):
    """DVR-style views: a circle at 30 degrees elevation, azimuth steps of 360 / num_views (+-1
    degree jitter), distance ~2.7, looking at the origin. Returns (K [v, 3, 3], world_from_cam
    [v, 4, 4]) in the rotated NMR world (z up)."""
    az0 = rng.uniform(0, 2 * math.pi)
    K = nmr_intrinsics(height, width)
    el = math.radians(elevation_deg)
    poses = []
    for i in range(num_views):
        az = az0 + 2 * math.pi * i / num_views + math.radians(rng.uniform(-1, 1))
        d = rng.uniform(*distance)
        eye = d * np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
        poses.append(C.look_at(eye))
    return np.broadcast_to(K, (num_views, 3, 3)).copy(), np.stack(poses)


def obsurf_camera_positions(rng, num_views: int = 3, distance: tuple[float, float] = (10.0, 12.7),
                            elevation_deg: tuple[float, float] = (22.0, 42.0)) -> np.ndarray:
    """ObSuRF camera positions [v, 3] (they look at the origin, z up) ~10-12.7 units away."""
    az = rng.uniform(0, 2 * math.pi, num_views)
    el = np.radians(rng.uniform(*elevation_deg, num_views))
    d = rng.uniform(*distance, num_views)
    return d[:, None] * np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], -1)


def msn_intrinsics(height: int = 128, width: int = 128, focal_px: float = 140.0) -> np.ndarray:
    """MultiShapeNet's K: fx = fy = 140 px, principal point at the image centre (128 x 128)."""
    return np.array([[focal_px * width / 128, 0.0, width / 2], [0.0, focal_px * height / 128,
                     height / 2], [0.0, 0.0, 1.0]])


def msn_cameras(rng, num_views: int = 10, height: int = 128, width: int = 128,
                distance: tuple[float, float] = (9.0, 13.0),
                elevation_deg: tuple[float, float] = (15.0, 60.0), target_std: float = 0.1):
    """Cameras on a half-sphere shell (radius 9-13, elevation 15-60 degrees, random azimuths)
    looking at the scene centre (jittered by ``target_std``), z up. Returns (K [v, 3, 3],
    world_from_cam [v, 4, 4])."""
    az = rng.uniform(0, 2 * math.pi, num_views)
    el = np.radians(rng.uniform(*elevation_deg, num_views))
    d = rng.uniform(*distance, num_views)
    eyes = d[:, None] * np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], -1)
    targets = rng.normal(0.0, target_std, (num_views, 3))
    poses = np.stack([C.look_at(e, t) for e, t in zip(eyes, targets)])
    K = msn_intrinsics(height, width)
    return np.broadcast_to(K, (num_views, 3, 3)).copy(), poses


def video_cameras(rng, num_views: int, height: int, width: int,
                  distance: tuple[float, float] = (7.5, 9.0),
                  eye_height: tuple[float, float] = (1.0, 1.8)):
    """A hand-held video walking into the scene, like RealEstate10K / ACID clips: the camera starts
    7.5-9 units from the centre at eye height, walks 1.5-3 units towards it with a lateral sway and
    a slow pan, looking ahead and slightly down (level: no roll), z up. Intrinsics: square pixels,
    horizontal focal 0.5-0.62 of the width, principal point within 2% of the centre. Returns (K
    [v, 3, 3] pixels, world_from_cam [v, 4, 4] OpenCV)."""
    az = rng.uniform(0, 2 * math.pi)
    start = rng.uniform(*distance) * np.array([math.cos(az), math.sin(az)])
    h = rng.uniform(*eye_height)
    turn = rng.uniform(-0.3, 0.3)
    heading = -start / np.linalg.norm(start)
    heading = np.array([[math.cos(turn), -math.sin(turn)], [math.sin(turn), math.cos(turn)]]) @ heading
    side = np.array([-heading[1], heading[0]])
    travel, sway, freq = rng.uniform(1.5, 3.0), rng.uniform(0.05, 0.2), rng.uniform(0.5, 1.5)
    pan, phase = rng.uniform(0.02, 0.12), rng.uniform(0, 2 * math.pi)
    poses = []
    for i in range(num_views):
        s = i / max(num_views - 1, 1)
        xy = start + heading * travel * s + side * sway * math.sin(2 * math.pi * freq * s + phase)
        eye = np.array([*xy, h + 0.03 * math.sin(4 * math.pi * s)])
        a = pan * math.sin(2 * math.pi * s + phase)
        look = math.cos(a) * heading + math.sin(a) * side
        poses.append(C.look_at(eye, np.array([*(xy + 4.0 * look), 0.4 * h])))
    f = rng.uniform(0.5, 0.62) * width
    K = np.array([[f, 0.0, width * (0.5 + rng.uniform(-0.02, 0.02))],
                  [0.0, f, height * (0.5 + rng.uniform(-0.02, 0.02))], [0.0, 0.0, 1.0]])
    return np.broadcast_to(K, (num_views, 3, 3)).copy(), np.stack(poses)


def ring_cameras(rng, num_views: int, height: int, width: int, distance: float,
                 elevation_deg: float, target_z: float = 0.0, focal_px: float = 140.0):
    """An NMR-like ring: ``num_views`` cameras at one elevation (degrees) and distance (world
    units) from the point (0, 0, ``target_z``), azimuths evenly spaced from a random start, level
    and looking at that point (z up). ``focal_px`` is MSN's focal length for 128 px images, scaled
    to the image size. Returns (K [v, 3, 3], world_from_cam [v, 4, 4])."""
    az = rng.uniform(0, 2 * math.pi) + 2 * math.pi * np.arange(num_views) / num_views
    el = math.radians(elevation_deg)
    target = np.array([0.0, 0.0, target_z])
    eyes = target + distance * np.stack([np.cos(az) * math.cos(el), np.sin(az) * math.cos(el),
                                         np.full(num_views, math.sin(el))], -1)
    poses = np.stack([C.look_at(e, target) for e in eyes])
    K = msn_intrinsics(height, width, focal_px)
    return np.broadcast_to(K, (num_views, 3, 3)).copy(), poses
