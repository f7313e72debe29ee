"""Synthetic CLEVR-like scenes: the scene model and its deterministic sampling (pure numpy).

A scene is a ground plane z = 0 (textured as a function of world x, y) with a few coloured spheres,
boxes and vertical cylinders resting on it, without overlap, lit by one directional light plus
ambient light (Lambertian, with hard shadows), in front of a procedural environment map at infinity
(a function of the ray direction only, rotated about z per scene). NMR-style scenes instead hold one
to three objects centred at the origin in front of a white background, like ShapeNet renders.
``pipeline.synthetic.raycast`` renders them.

Everything is deterministic from (seed, split, scene index): ``scene_rng`` seeds
``numpy.random.default_rng`` with a ``SeedSequence`` of those (plus a stream number for cameras and
per-view noise). Units are world units (the source dataset's), frames as in
``docs/CONVENTIONS.md``.
"""
from __future__ import annotations

import colorsys
import dataclasses
import math

import numpy as np

SPLITS = ('train', 'val', 'test')
SPLIT_CODE = {'train': 0, 'val': 1, 'test': 2}

KINDS = ('sphere', 'box', 'cylinder')  # object kind k has category id k + 1
CATEGORY_NAMES = ('background',) + KINDS  # category 0: environment and ground

# Random streams of one scene (the last SeedSequence entry): scene content, cameras, per-view noise.
STREAM_SCENE, STREAM_CAMERAS, STREAM_NOISE = 0, 1, 2


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
    # The CPU demo (format 'msn-demo'): one or two large plain objects near the centre on a plain
    # ground, seen by a ring of cameras (``rigs.ring_cameras``), so that a small SRT learns to
    # render them within minutes on two CPU cores (docs/SYNTHETIC.md, README "Results").
    'demo': SceneStyle(num_objects=(1, 2), extent=0.9, radius=(0.7, 1.1), noise_std=0.0,
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


def without_objects(scene: Scene) -> Scene:
    """The same scene with every object removed (ground, sky and light unchanged): what a model
    that does not see objects could at best render (the object-blind baseline)."""
    return dataclasses.replace(
        scene, kind=scene.kind[:0], center=scene.center[:0], radius=scene.radius[:0],
        half_height=scene.half_height[:0], yaw=scene.yaw[:0], color=scene.color[:0],
        tex_k=scene.tex_k[:0], tex_phase=scene.tex_phase[:0])


def scene_rng(seed: int, split: str, index: int, stream: int = STREAM_SCENE) -> np.random.Generator:
    """The generator of one random stream of scene ``index`` of ``split`` (deterministic)."""
    if split not in SPLIT_CODE:
        raise ValueError(f'unknown split {split!r}; expected one of {SPLITS}')
    if seed < 0 or index < 0:
        raise ValueError(f'seed and index must be >= 0, got {seed} and {index}')
    return np.random.default_rng(np.random.SeedSequence([seed, SPLIT_CODE[split], index, stream]))


def _saturated_colors(rng, n: int) -> np.ndarray:
    """n clearly distinct saturated colours: hues spread around the circle, then jittered."""
    hues = (rng.random() + np.arange(n) / n + rng.uniform(-0.25, 0.25, n) / max(n, 1)) % 1.0
    hues = rng.permutation(hues)
    sats, vals = rng.uniform(0.65, 0.95, n), rng.uniform(0.75, 1.0, n)
    return np.array([colorsys.hsv_to_rgb(h, s, v) for h, s, v in zip(hues, sats, vals)])


def footprint_radius(kind: int, radius: float) -> float:
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
            if all(np.hypot(*(xy - c[:2])) > footprint_radius(kind, r) + footprint_radius(k, rr) + 0.1
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
    bounds = np.array([footprint_radius(k, r) for k, r in zip(kinds, radii)])
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
        demo = np.random.default_rng([seed, SPLIT_CODE[split], index, STREAM_SCENE, 1])
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
