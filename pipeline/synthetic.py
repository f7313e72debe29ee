"""Synthetic CLEVR-like scenes and an analytic ray-caster (pure numpy; no TensorFlow).

The project cannot download NMR, ObSuRF or MultiShapeNet, so tests, benchmarks and the demo render
their own small scenes; ``pipeline.synthetic_writers`` stores them in each dataset's on-disk format.

A scene is a ground plane z = 0 (textured as a function of world x, y) with a few coloured spheres,
boxes and vertical cylinders resting on it, without overlap, lit by one directional light plus
ambient light (Lambertian, with hard shadows), in front of a procedural environment map at infinity
(a function of the ray direction only, rotated about z per scene). NMR-style scenes instead hold one
to three objects centred at the origin in front of a white background, like ShapeNet renders.

Rendering intersects the rays of ``pipeline.cameras.image_rays(K, world_from_cam, h, w)`` (all
pixels at once) with the scene analytically. Shading depends only on the surface point, never on the
viewer, so every view of a scene is consistent by construction; the optional per-pixel render noise
(a few levels of 255, seeded per view) is the only view-dependent term. Units are world units (the
source dataset's), directions unit length, frames as in ``docs/CONVENTIONS.md``.

Everything is deterministic from (seed, split, scene index): ``scene_rng`` seeds
``numpy.random.default_rng`` with a ``SeedSequence`` of those (plus a stream number for cameras and
per-view noise).

>>> scene = sample_scene('msn', seed=0, split='train', index=0)
>>> K, poses = msn_cameras(scene_rng(0, 'train', 0, STREAM_CAMERAS), num_views=2)
>>> out = render(scene, K[0], poses[0], 16, 16)
>>> out['rgb'].shape, out['rgb'].dtype.name, out['depth'].shape, out['category'].shape
((16, 16, 3), 'uint8', (16, 16), (16, 16))
"""
from __future__ import annotations

import colorsys
import dataclasses
import math

import numpy as np

from pipeline import cameras as C

SPLITS = ('train', 'val', 'test')
_SPLIT_CODE = {'train': 0, 'val': 1, 'test': 2}

KINDS = ('sphere', 'box', 'cylinder')  # object kind k has category id k + 1
CATEGORY_NAMES = ('background',) + KINDS  # category 0: environment and ground

# Random streams of one scene (the last SeedSequence entry): scene content, cameras, per-view noise.
STREAM_SCENE, STREAM_CAMERAS, STREAM_NOISE = 0, 1, 2

_EPS = 1e-9


# ----------------------------------------------------------------------------- scene description

@dataclasses.dataclass(frozen=True)
class SceneStyle:
    """How one dataset's scenes are sampled."""
    num_objects: tuple[int, int]  # inclusive range of the number of objects
    extent: float  # object centres lie in [-extent, extent]^2 (world units; not used by NMR)
    radius: tuple[float, float]  # footprint radius range (sphere radius, box half-width, ...)
    white_background: bool = False  # NMR: no ground, no environment, background exactly 255
    noise_std: float = 2.0  # render noise, standard deviation in levels of 255 (0: none)
    textured: bool = True  # ground tiles, object waves, clouds and skyline (False: plain colours)


# Noise levels are chosen so that the PNG sizes resemble the real datasets' (measured, mean per
# colour image): MSN 128x128 ~35 KiB (real: 25-40 KB, textured objects, HDRI backgrounds);
# ObSuRF 320x240 RGBA ~110 KiB (noise-free: the tiled ground carries the detail); NMR 64x64 ~1.6 KiB.
STYLES = {
    # ObSuRF CLEVR3D: CLEVR scale, at most 6 objects so the reference's max_objects=6 keeps all.
    'clevr': SceneStyle(num_objects=(3, 6), extent=3.0, radius=(0.35, 0.75), noise_std=0.0),
    # ObSuRF-MSN: 2-4 objects (its metadata has 5 object slots).
    'obsurf-msn': SceneStyle(num_objects=(2, 4), extent=2.5, radius=(0.5, 0.9), noise_std=0.0),
    # SRT MultiShapeNet: more objects, cameras on a shell ~9-13 units away.
    'msn': SceneStyle(num_objects=(3, 8), extent=3.0, radius=(0.35, 0.8)),
    # NMR (ShapeNet renders): 1-3 objects centred at the origin, white background.
    'nmr': SceneStyle(num_objects=(1, 3), extent=0.5, radius=(0.15, 0.3),
                      white_background=True, noise_std=1.5),
    # The CPU demo: few large plain objects on a plain ground under a plain sky, so that a small
    # SRT learns them within minutes (MSN layout at 64x64, format 'msn-demo').
    'demo': SceneStyle(num_objects=(2, 4), extent=2.2, radius=(0.7, 1.1), noise_std=0.0,
                       textured=False),
}


@dataclasses.dataclass(frozen=True)
class Scene:
    """One scene. Object arrays have leading length n (the number of objects).

    kind [n] int (index into KINDS); center [n, 3] (world units; boxes and cylinders span
    center.z +- half_height, spheres have half_height = radius); radius [n] (sphere radius, box
    half-width, cylinder radius); half_height [n]; yaw [n] (radians, about +z); color [n, 3] in
    [0, 1]; tex_k [n, 3, 3] / tex_phase [n, 3] (object-local texture waves). light_dir [3] points
    towards the light. The ground and environment parameters are unused for white-background scenes.
    """
    style: str
    kind: np.ndarray
    center: np.ndarray
    radius: np.ndarray
    half_height: np.ndarray
    yaw: np.ndarray
    color: np.ndarray
    tex_k: np.ndarray
    tex_phase: np.ndarray
    light_dir: np.ndarray
    ambient: float
    # ground (world x, y): tile size, base / grout / far colours, fine-grain waves
    tile_size: float
    ground_color: np.ndarray
    grout_color: np.ndarray
    far_color: np.ndarray
    ground_k: np.ndarray  # [g, 2] wave vectors (radians per unit)
    ground_phase: np.ndarray  # [g]
    tile_hash: int
    # environment (direction only)
    env_from_world: np.ndarray  # [3, 3] rotation about z
    zenith_color: np.ndarray
    horizon_color: np.ndarray
    cloud_k: np.ndarray  # [c, 3]
    cloud_phase: np.ndarray  # [c]
    skyline_freq: np.ndarray  # [s] integer frequencies in azimuth
    skyline_amp: np.ndarray  # [s]
    skyline_phase: np.ndarray  # [s]
    skyline_color: np.ndarray
    sun_dir: np.ndarray  # [3] in the environment frame

    @property
    def num_objects(self) -> int:
        return len(self.kind)

    @property
    def category(self) -> np.ndarray:
        """Category id per object [n] (1 sphere, 2 box, 3 cylinder; 0 is the background)."""
        return self.kind + 1


def scene_rng(seed: int, split: str, index: int, stream: int = STREAM_SCENE) -> np.random.Generator:
    """The generator of one random stream of scene ``index`` of ``split`` (deterministic)."""
    if split not in _SPLIT_CODE:
        raise ValueError(f'unknown split {split!r}; expected one of {SPLITS}')
    if seed < 0 or index < 0:
        raise ValueError(f'seed and index must be >= 0, got {seed} and {index}')
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODE[split], index, stream]))


def _saturated_colors(rng, n: int) -> np.ndarray:
    """n clearly distinct saturated colours: hues spread around the circle, then jittered."""
    hues = (rng.random() + np.arange(n) / n + rng.uniform(-0.25, 0.25, n) / max(n, 1)) % 1.0
    hues = rng.permutation(hues)
    sats, vals = rng.uniform(0.65, 0.95, n), rng.uniform(0.75, 1.0, n)
    return np.array([colorsys.hsv_to_rgb(h, s, v) for h, s, v in zip(hues, sats, vals)])


def _footprint(kind: int, radius: float) -> float:
    """Radius of the circle around an object's footprint (boxes: their half-diagonal)."""
    return radius * math.sqrt(2.0) if KINDS[kind] == 'box' else radius


def _place_objects(rng, style: SceneStyle, n: int):
    """Non-overlapping footprints: rejection sampling of centres in the square (bounding circles
    0.1 apart); stops early if 200 tries fail."""
    kinds, centers, radii, half_heights, yaws = [], [], [], [], []
    for _ in range(n):
        for _attempt in range(200):
            kind = int(rng.integers(len(KINDS)))
            r = rng.uniform(*style.radius)
            xy = rng.uniform(-style.extent, style.extent, 2)
            if all(np.hypot(*(xy - c[:2])) > _footprint(kind, r) + _footprint(k, rr) + 0.1
                   for c, k, rr in zip(centers, kinds, radii)):
                break
        else:
            break
        hh = r if KINDS[kind] == 'sphere' else r * rng.uniform(0.7, 1.4)
        kinds.append(kind)
        centers.append(np.array([xy[0], xy[1], hh]))  # resting on the ground z = 0
        radii.append(r)
        half_heights.append(hh)
        yaws.append(rng.uniform(0.0, 2.0 * math.pi))
    return (np.array(kinds, dtype=np.int64), np.array(centers), np.array(radii),
            np.array(half_heights), np.array(yaws))


def _place_nmr_objects(rng, style: SceneStyle, n: int):
    """A main object at the origin and smaller companions beside it, all on one (invisible) plane,
    the group re-centred on the origin (NMR's ShapeNet models are centred in the unit cube)."""
    kinds = rng.integers(len(KINDS), size=n)
    radii = np.concatenate([[rng.uniform(0.35, 0.5)], rng.uniform(*style.radius, n - 1)])
    half_heights = np.array([r if KINDS[k] == 'sphere' else r * rng.uniform(0.7, 1.3)
                             for k, r in zip(kinds, radii)])
    bounds = np.array([_footprint(k, r) for k, r in zip(kinds, radii)])
    xy = [np.zeros(2)]
    for i in range(1, n):
        a = rng.uniform(0, 2 * math.pi)
        xy.append((bounds[0] + bounds[i] + 0.05) * np.array([math.cos(a), math.sin(a)]))
        if i == 2 and np.hypot(*(xy[2] - xy[1])) < bounds[1] + bounds[2] + 0.05:
            xy[2] = -xy[1] / np.linalg.norm(xy[1]) * (bounds[0] + bounds[2] + 0.05)
    xy = np.array(xy)
    floor = -half_heights[0]
    centers = np.concatenate([xy, (floor + half_heights)[:, None]], axis=1)
    centers -= np.array([*centers[:, :2].mean(0), 0.0])
    return kinds.astype(np.int64), centers, radii, half_heights, rng.uniform(0, 2 * math.pi, n)


def _unless(drawn: float, value: float | None) -> float:
    return drawn if value is None else value


def sample_scene(style: str, seed: int, split: str, index: int) -> Scene:
    """Scene ``index`` of ``split`` in the style ``style`` (a key of STYLES), deterministically."""
    if style not in STYLES:
        raise ValueError(f'unknown scene style {style!r}; expected one of {sorted(STYLES)}')
    st = STYLES[style]
    rng = scene_rng(seed, split, index, STREAM_SCENE)
    n = int(rng.integers(st.num_objects[0], st.num_objects[1] + 1))
    place = _place_nmr_objects if st.white_background else _place_objects
    kind, center, radius, half_height, yaw = place(rng, st, n)
    n = len(kind)
    # Mild object texture: three waves in object-local coordinates, 1-3 cycles per radius.
    tex_k = rng.normal(size=(n, 3, 3))
    tex_k *= (rng.uniform(2.0, 6.0, (n, 3, 1)) * math.pi / np.maximum(radius, 1e-3)[:, None, None]
              / np.linalg.norm(tex_k, axis=-1, keepdims=True))
    az, el = rng.uniform(0, 2 * math.pi), math.radians(rng.uniform(35, 65))
    light_dir = np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
    ground_k = rng.normal(size=(8, 2))
    ground_k *= rng.uniform(4.0, 40.0, (8, 1)) / np.linalg.norm(ground_k, axis=-1, keepdims=True)
    cloud_k = rng.normal(size=(10, 3))
    cloud_k *= rng.uniform(3.0, 24.0, (10, 1)) / np.linalg.norm(cloud_k, axis=-1, keepdims=True)
    env_angle = rng.uniform(0, 2 * math.pi)
    c, s = math.cos(env_angle), math.sin(env_angle)
    sky_h = rng.uniform(0.52, 0.65)  # blue-ish skies, muted so that objects stand out
    g_h, g_s, g_v = rng.uniform(0.0, 1.0), rng.uniform(0.03, 0.2), rng.uniform(0.45, 0.65)
    sky_s, far_s, far_v = None, 0.15, 0.75
    if style == 'demo':  # per-scene colours of ground and sky: what a model sees first
        demo = np.random.default_rng([seed, _SPLIT_CODE[split], index, STREAM_SCENE, 1])
        sky_h, sky_s = demo.uniform(0.0, 1.0), demo.uniform(0.25, 0.55)
        g_s, g_v = demo.uniform(0.3, 0.7), demo.uniform(0.3, 0.7)
        far_s, far_v = sky_s * 0.5, 0.8
    skyline_freq = rng.choice(np.arange(2, 120), size=24, replace=False)
    sun_az, sun_el = rng.uniform(0, 2 * math.pi), rng.uniform(0.3, 1.0)
    return Scene(
        style=style, kind=kind, center=center, radius=radius, half_height=half_height, yaw=yaw,
        color=_saturated_colors(rng, n), tex_k=tex_k, tex_phase=rng.uniform(0, 2 * math.pi, (n, 3)),
        light_dir=light_dir, ambient=float(rng.uniform(0.25, 0.35)),
        tile_size=float(rng.uniform(0.6, 1.6)),
        ground_color=np.array(colorsys.hsv_to_rgb(g_h, g_s, g_v)),
        grout_color=np.array(colorsys.hsv_to_rgb(g_h, g_s, g_v * 0.6)),
        far_color=np.array(colorsys.hsv_to_rgb(sky_h, far_s, far_v)),
        ground_k=ground_k, ground_phase=rng.uniform(0, 2 * math.pi, 8),
        tile_hash=int(rng.integers(1, 2**20)),
        env_from_world=np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]]),
        # (the draw stays in place so that the other styles' scenes do not change)
        zenith_color=np.array(colorsys.hsv_to_rgb(sky_h, _unless(rng.uniform(0.35, 0.6), sky_s),
                                                  0.8)),
        horizon_color=np.array(colorsys.hsv_to_rgb(sky_h, 0.12, 0.9)),
        cloud_k=cloud_k, cloud_phase=rng.uniform(0, 2 * math.pi, 10),
        skyline_freq=skyline_freq.astype(np.float64),
        skyline_amp=rng.uniform(0.2, 1.0, 24) / skyline_freq ** 0.7 * 0.12,
        skyline_phase=rng.uniform(0, 2 * math.pi, 24),
        skyline_color=np.array(colorsys.hsv_to_rgb(rng.uniform(0.2, 0.4), 0.25, 0.45)),
        sun_dir=np.array([math.cos(sun_el) * math.cos(sun_az), math.cos(sun_el) * math.sin(sun_az),
                          math.sin(sun_el)]),
    )


# ----------------------------------------------------------------------------- cameras

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


# ----------------------------------------------------------------------------- intersection

def _to_local(scene: Scene, i: int, p: np.ndarray, is_direction: bool = False) -> np.ndarray:
    """World points (or directions) [r, 3] -> object i's frame (centre at 0, yaw undone)."""
    c, s = math.cos(scene.yaw[i]), math.sin(scene.yaw[i])
    q = p if is_direction else p - scene.center[i]
    return np.stack([c * q[:, 0] + s * q[:, 1], -s * q[:, 0] + c * q[:, 1], q[:, 2]], axis=-1)


def _bounding_sphere(scene: Scene, i: int) -> tuple[np.ndarray, float]:
    """Centre and radius of a sphere enclosing object i (slightly enlarged)."""
    radius = math.hypot(_footprint(scene.kind[i], scene.radius[i]), scene.half_height[i]) * 1.001
    return scene.center[i], radius


def _candidates(b: np.ndarray, cc: np.ndarray) -> np.ndarray:
    """Indices of the rays that meet a sphere ahead of their origin, given b = d . (o - c) and
    cc = |o - c|^2 - R^2."""
    disc = b * b - cc
    return np.flatnonzero((disc >= 0) & (np.sqrt(np.maximum(disc, 0.0)) - b > _EPS))


def _intersect_object(scene: Scene, i: int, o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Ray distance t [r] to object i for one origin o [3] and unit directions d [r, 3]; inf where
    the ray misses it (or hits only behind its origin). Only the rays that meet the object's
    bounding sphere are intersected exactly."""
    center, radius = _bounding_sphere(scene, i)
    oc = o - center
    cand = _candidates(d @ oc, np.full(len(d), oc @ oc - radius * radius))
    t = np.full(len(d), np.inf)
    if len(cand):
        t[cand] = _intersect_exact(scene, i, o, d[cand])
    return t


def _intersect_exact(scene: Scene, i: int, o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Ray distance t [r] to object i for origins o [r, 3] (or [3]) and unit directions d [r, 3],
    inf for a miss; every ray is intersected exactly (no culling)."""
    kind = KINDS[scene.kind[i]]
    r, h = scene.radius[i], scene.half_height[i]
    o = np.broadcast_to(o, d.shape)
    p = _to_local(scene, i, o)
    v = _to_local(scene, i, d, is_direction=True)
    with np.errstate(divide='ignore', invalid='ignore', over='ignore'):
        if kind == 'sphere':
            b = np.einsum('ij,ij->i', p, v)
            disc = b * b - (np.einsum('ij,ij->i', p, p) - r * r)
            t = -b - np.sqrt(np.maximum(disc, 0.0))
            return np.where((disc >= 0) & (t > _EPS), t, np.inf)
        v_safe = np.where(np.abs(v) < 1e-12, 1e-12, v)
        if kind == 'box':
            ext = np.array([r, r, h])
            t1, t2 = (-ext - p) / v_safe, (ext - p) / v_safe
            tmin = np.minimum(t1, t2).max(axis=-1)
            tmax = np.maximum(t1, t2).min(axis=-1)
            return np.where((tmax >= tmin) & (tmin > _EPS), tmin, np.inf)
        # vertical cylinder: side (quadratic in x, y) and the two caps
        a = v[:, 0] ** 2 + v[:, 1] ** 2
        b = p[:, 0] * v[:, 0] + p[:, 1] * v[:, 1]
        disc = b * b - a * (p[:, 0] ** 2 + p[:, 1] ** 2 - r * r)
        t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / np.maximum(a, 1e-300)
        z_side = p[:, 2] + t_side * v[:, 2]
        t_side = np.where((disc >= 0) & (a > 1e-12) & (np.abs(z_side) <= h) & (t_side > _EPS),
                          t_side, np.inf)
        t = t_side
        for zc in (h, -h):
            tc = (zc - p[:, 2]) / v_safe[:, 2]
            xc, yc = p[:, 0] + tc * v[:, 0], p[:, 1] + tc * v[:, 1]
            t = np.minimum(t, np.where((xc * xc + yc * yc <= r * r) & (tc > _EPS), tc, np.inf))
        return t


def _object_normals(scene: Scene, i: int, points: np.ndarray) -> np.ndarray:
    """Outward unit normals [r, 3] (world) at points [r, 3] on object i's surface."""
    kind = KINDS[scene.kind[i]]
    r, h = scene.radius[i], scene.half_height[i]
    q = _to_local(scene, i, points)
    if kind == 'sphere':
        n = q / r
    elif kind == 'box':
        rel = np.abs(q) / np.array([r, r, h])
        axis = rel.argmax(axis=-1)
        n = np.zeros_like(q)
        n[np.arange(len(q)), axis] = np.sign(q[np.arange(len(q)), axis])
    else:
        radial = np.hypot(q[:, 0], q[:, 1]) / r
        cap = np.abs(q[:, 2]) / h >= radial
        n = np.where(cap[:, None], np.stack([0 * q[:, 0], 0 * q[:, 0], np.sign(q[:, 2])], -1),
                     np.stack([q[:, 0], q[:, 1], 0 * q[:, 0]], -1) / r)
    # back to world axes (undo the yaw rotation)
    c, s = math.cos(scene.yaw[i]), math.sin(scene.yaw[i])
    n = np.stack([c * n[:, 0] - s * n[:, 1], s * n[:, 0] + c * n[:, 1], n[:, 2]], axis=-1)
    return n / np.linalg.norm(n, axis=-1, keepdims=True)


def trace(scene: Scene, origin: np.ndarray, directions: np.ndarray):
    """First hit along rays from one origin [3] with unit directions [r, 3].

    Returns (t [r] ray distance, inf for none; hit [r] int: object index, ``num_objects`` for the
    ground, -1 for nothing).
    """
    n = scene.num_objects
    t = np.full(len(directions), np.inf)
    hit = np.full(len(directions), -1, dtype=np.int64)
    for i in range(n):
        ti = _intersect_object(scene, i, origin, directions)
        closer = ti < t
        t[closer], hit[closer] = ti[closer], i
    if not STYLES[scene.style].white_background:
        oz = origin[2]
        with np.errstate(divide='ignore', invalid='ignore'):
            tg = np.where((directions[:, 2] < -1e-12) & (oz > 0), -oz / directions[:, 2], np.inf)
        closer = tg < t
        t[closer], hit[closer] = tg[closer], n
    return t, hit


def _in_shadow(scene: Scene, points: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """[r] bool: the light is blocked by an object (the ground never casts shadows).

    All shadow rays share the direction ``light_dir``, so the bounding-sphere test of each object
    needs one matrix-vector product: with o the (offset) points and c the sphere centre,
    d . (o - c) = o . d - c . d and |o - c|^2 = |o|^2 - 2 o . c + |c|^2.
    """
    origins = points + 1e-6 * normals
    light = scene.light_dir
    o_dot_l = origins @ light
    o_sq = np.einsum('ij,ij->i', origins, origins)
    blocked = np.zeros(len(points), dtype=bool)
    for i in range(scene.num_objects):
        center, radius = _bounding_sphere(scene, i)
        cand = _candidates(o_dot_l - center @ light,
                           o_sq - 2.0 * (origins @ center) + center @ center - radius * radius)
        cand = cand[~blocked[cand]]
        if len(cand):
            d = np.broadcast_to(light, (len(cand), 3))
            blocked[cand] = np.isfinite(_intersect_exact(scene, i, origins[cand], d))
    return blocked


# ----------------------------------------------------------------------------- appearance

def _rows_times(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """x [r, a] @ m.T for m [k, a]: every row of x multiplied by m. (numpy's matmul is ~100x
    slower with a transposed, F-ordered right operand, hence the contiguous copy.)"""
    return x @ np.ascontiguousarray(m.T)


def _mean_rows(x: np.ndarray) -> np.ndarray:
    """Mean over the last axis of x [r, k] (a matrix-vector product: faster than .mean(-1))."""
    return x @ np.full(x.shape[-1], 1.0 / x.shape[-1], dtype=x.dtype)


def _tile_hash(ix: np.ndarray, iy: np.ndarray, salt: int) -> np.ndarray:
    """Deterministic per-tile value in [0, 1) from integer tile coordinates (integer hashing)."""
    h = (ix.astype(np.int64) * 73856093) ^ (iy.astype(np.int64) * 19349663) ^ salt
    h = (h ^ (h >> 13)) * 1274126177
    return ((h ^ (h >> 16)) & 0xFFFF) / 65536.0


def ground_albedo(scene: Scene, xy: np.ndarray) -> np.ndarray:
    """Ground colour [r, 3] at world points xy [r, 2]: tiles of varying brightness, dark grout
    lines, fine-grain waves, fading to ``far_color`` beyond radius 6 (a function of x, y only)."""
    if not STYLES[scene.style].textured:
        return np.broadcast_to(scene.ground_color, (len(xy), 3))
    u = xy / scene.tile_size
    iu = np.floor(u)
    fu = u - iu
    tile = _tile_hash(iu[:, 0], iu[:, 1], scene.tile_hash)
    grout = np.minimum(fu, 1.0 - fu).min(axis=-1) < 0.03
    # float32 is plenty for a texture and twice as fast
    grain = _mean_rows(np.sin(_rows_times(xy.astype(np.float32), scene.ground_k.astype(np.float32))
                              + scene.ground_phase.astype(np.float32)))
    shade = (1.0 + 0.25 * (tile - 0.5)) * (1.0 + 0.35 * grain)
    albedo = np.where(grout[:, None], scene.grout_color, scene.ground_color * shade[:, None])
    fade = np.exp(-np.maximum(np.hypot(xy[:, 0], xy[:, 1]) - 6.0, 0.0) / 20.0)[:, None]
    return scene.far_color + (albedo - scene.far_color) * fade


def object_albedo(scene: Scene, i: int, points: np.ndarray) -> np.ndarray:
    """Colour [r, 3] of object i at surface points [r, 3]: its colour with a mild (+-12%) texture
    of three waves in object-local coordinates."""
    if not STYLES[scene.style].textured:
        return np.broadcast_to(scene.color[i], (len(points), 3))
    q = _to_local(scene, i, points)
    waves = np.sin(_rows_times(q, scene.tex_k[i]) + scene.tex_phase[i])  # [r, 3]
    pattern = 0.5 * waves[:, 0] + 0.3 * waves[:, 1] * waves[:, 2]
    return scene.color[i] * (1.0 + 0.15 * pattern)[:, None]


def environment(scene: Scene, directions: np.ndarray) -> np.ndarray:
    """Radiance [r, 3] of the environment at infinity in unit directions [r, 3] (world): sky
    gradient, clouds, a sun glow and a distant skyline, rotated about z per scene."""
    d = _rows_times(directions, scene.env_from_world)
    z = np.clip(d[:, 2], -1.0, 1.0)
    el = np.arcsin(z)
    sky = scene.horizon_color + (scene.zenith_color - scene.horizon_color) * (
        np.clip(el / 0.8, 0.0, 1.0) ** 0.7)[:, None]
    if not STYLES[scene.style].textured:
        return sky
    clouds = _mean_rows(np.sin(_rows_times(d, scene.cloud_k) + scene.cloud_phase))
    cover = np.clip((clouds - 0.05) * 4.0, 0.0, 1.0) * np.clip(el * 5.0, 0.0, 1.0)
    sky = sky + (0.95 - sky) * (0.8 * cover)[:, None]
    sky = sky + 0.4 * np.exp((d @ scene.sun_dir - 1.0) * 300.0)[:, None]
    az = np.arctan2(d[:, 1], d[:, 0])
    skyline = 0.02 + (np.sin(np.outer(az, scene.skyline_freq) + scene.skyline_phase)
                      @ scene.skyline_amp)
    windows = (np.sin(az * 180.0) > 0.6) & (np.sin(el * 240.0) > 0.0)
    land = scene.skyline_color * (1.0 - 0.25 * windows)[:, None] * (0.7 + 0.3 * np.clip(
        (skyline - el)[:, None] * -20.0 + 1.0, 0.0, 1.0))
    return np.where((el < skyline)[:, None], land, sky)


# ----------------------------------------------------------------------------- rendering

def render_rays(scene: Scene, origin: np.ndarray, directions: np.ndarray) -> dict[str, np.ndarray]:
    """Noise-free radiance of rays from one origin [3] (a camera centre), unit directions [r, 3].

    Returns 'radiance' [r, 3] float in [0, 1], 'depth' [r] (ray distance; inf where nothing is hit),
    'object_id' [r] int (0 background and ground, i + 1 for object i), 'category' [r] int
    (0 background and ground, else the object kind + 1).
    """
    directions = np.asarray(directions, dtype=np.float64)
    origin = np.asarray(origin, dtype=np.float64)
    t, hit = trace(scene, origin, directions)
    n = scene.num_objects
    radiance = np.empty(directions.shape)
    miss = hit < 0
    if STYLES[scene.style].white_background:
        radiance[miss] = 1.0
    elif miss.any():
        radiance[miss] = environment(scene, directions[miss])
    surf = ~miss
    if surf.any():
        pts = origin + t[surf, None] * directions[surf]
        ids = hit[surf]
        normals = np.empty_like(pts)
        albedo = np.empty_like(pts)
        for i in range(n + 1):
            sel = ids == i
            if not sel.any():
                continue
            if i == n:  # ground
                normals[sel] = (0.0, 0.0, 1.0)
                albedo[sel] = ground_albedo(scene, pts[sel, :2])
            else:
                normals[sel] = _object_normals(scene, i, pts[sel])
                albedo[sel] = object_albedo(scene, i, pts[sel])
        lambert = np.clip(normals @ scene.light_dir, 0.0, None)
        lit = lambert > 0
        shadow = np.zeros(len(pts), dtype=bool)
        shadow[lit] = _in_shadow(scene, pts[lit], normals[lit])
        light = scene.ambient + (1.0 - scene.ambient) * np.where(shadow, 0.0, lambert)
        radiance[surf] = albedo * light[:, None]
    object_id = np.where((hit >= 0) & (hit < n), hit + 1, 0)
    category = np.where(object_id > 0, scene.category[np.clip(hit, 0, max(n - 1, 0))], 0)
    return {'radiance': np.clip(radiance, 0.0, 1.0), 'depth': t, 'object_id': object_id,
            'category': category}


def render(scene: Scene, K, world_from_cam, height: int, width: int, *, noise_std: float = 0.0,
           noise_seed=None) -> dict[str, np.ndarray]:
    """Render one view with camera K [3, 3] (pixels) and world_from_cam [4, 4] (OpenCV).

    Returns 'rgb' [h, w, 3] uint8, 'depth' [h, w] float32 (ray distance, inf for the background),
    'object_id' [h, w] uint8 (0 background / ground, i + 1 object i) and 'category' [h, w] uint8
    (index into CATEGORY_NAMES). With ``noise_std`` > 0, Gaussian noise of that many levels of 255
    (from ``numpy.random.default_rng(noise_seed)``) is added before rounding; white-background
    scenes keep their background exactly white.
    """
    origins, directions = C.image_rays(K, world_from_cam, height, width)
    out = render_rays(scene, origins[0, 0], directions.reshape(-1, 3))
    rgb = out['radiance'] * 255.0
    if noise_std > 0:
        noise = np.random.default_rng(noise_seed).normal(0.0, noise_std, rgb.shape)
        if STYLES[scene.style].white_background:
            noise *= (out['object_id'] > 0)[:, None]
        rgb = rgb + noise
    rgb = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return {'rgb': rgb.reshape(height, width, 3),
            'depth': out['depth'].astype(np.float32).reshape(height, width),
            'object_id': out['object_id'].astype(np.uint8).reshape(height, width),
            'category': out['category'].astype(np.uint8).reshape(height, width)}


def render_views(scene: Scene, K, world_from_cam, height: int, width: int, *, noise: bool = True,
                 seed: int = 0, split: str = 'train', index: int = 0) -> dict[str, np.ndarray]:
    """Render views of one scene: K [v, 3, 3], world_from_cam [v, 4, 4] -> the ``render`` outputs
    stacked [v, ...]. View j's noise (the scene style's ``noise_std``; none with ``noise=False``)
    is seeded by (seed, split, index, STREAM_NOISE + j)."""
    std = STYLES[scene.style].noise_std if noise else 0.0
    views = [render(scene, K[j], world_from_cam[j], height, width, noise_std=std,
                    noise_seed=np.random.SeedSequence([seed, _SPLIT_CODE[split], index,
                                                       STREAM_NOISE + j]))
             for j in range(len(world_from_cam))]
    return {k: np.stack([v[k] for v in views]) for k in views[0]}
