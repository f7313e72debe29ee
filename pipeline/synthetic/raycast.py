"""The analytic ray-caster of the synthetic scenes (``pipeline.synthetic.scene``; pure numpy).

Rendering intersects the rays of ``pipeline.cameras.image_rays(K, world_from_cam, h, w)`` (all
pixels at once) with the scene analytically. Shading depends only on the surface point, never on the
viewer, so every view of a scene is consistent by construction; the optional per-pixel render noise
(a few levels of 255, seeded per view) is the only view-dependent term. Units are world units,
directions unit length, frames as in ``docs/CONVENTIONS.md``.
"""
from __future__ import annotations

import math

import numpy as np

from pipeline import cameras as C
from pipeline.synthetic.scene import (KINDS, SPLIT_CODE, STREAM_NOISE, STYLES, Scene,
                                      footprint_radius)

_EPS = 1e-9


# ----------------------------------------------------------------------------- intersection

def _to_local(scene: Scene, i: int, p: np.ndarray, is_direction: bool = False) -> np.ndarray:
    """World points (or directions) [r, 3] -> object i's frame (centre at 0, yaw undone)."""
    c, s = math.cos(scene.yaw[i]), math.sin(scene.yaw[i])
    q = p if is_direction else p - scene.center[i]
    return np.stack([c * q[:, 0] + s * q[:, 1], -s * q[:, 0] + c * q[:, 1], q[:, 2]], axis=-1)


def _bounding_sphere(scene: Scene, i: int) -> tuple[np.ndarray, float]:
    """Centre and radius of a sphere enclosing object i (slightly enlarged)."""
    radius = math.hypot(footprint_radius(scene.kind[i], scene.radius[i]), scene.half_height[i]) * 1.001
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
    category = (np.where(object_id > 0, scene.category[np.clip(hit, 0, n - 1)], 0) if n
                else np.zeros_like(object_id))  # no object: nothing to index
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
                    noise_seed=np.random.SeedSequence([seed, SPLIT_CODE[split], index,
                                                       STREAM_NOISE + j]))
             for j in range(len(world_from_cam))]
    return {k: np.stack([v[k] for v in views]) for k in views[0]}
