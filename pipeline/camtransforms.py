"""Camera transforms for multi-view samples: pure numpy functions over images, intrinsics and poses
in the project's convention (``docs/CONVENTIONS.md``: ``K`` [.., 3, 3] in pixels with pixel centres
at +0.5, ``c2w`` = world_from_cam [.., 4, 4], OpenCV axes). Each keeps the image formation intact: a
world point projects onto the same image content before and after (tests/test_multiview.py checks
this by projecting points). The stream applies them as opt-in stages (``pipeline.viewsample``).

- ``resize_crop``: resize to cover (out_h, out_w) then centre-crop, with ``K`` adjusted exactly for
  any principal point (pixelSplat's crop shim scales fx, fy only: exact for centred ones);
- ``normalize_intrinsics``: pixelSplat's intrinsics divided by the image size;
- ``relative_poses``: poses in the frame of one camera (the first context view);
- ``lvsm_normalize``: LVSM's mean-pose re-centring and scaling (FORMATS.md 2.3);
- ``near_far``: the render range a scene's metadata states, in its world units.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np


# ----------------------------------------------------------------------------- resize and crop

def resize_crop_geometry(height: int, width: int, out_h: int, out_w: int
                         ) -> tuple[int, int, int, int]:
    """(scaled_h, scaled_w, top, left): an image of ``height`` x ``width`` is resized to
    scaled_h x scaled_w (one uniform factor, the smallest that covers out_h x out_w, each side
    rounded) and cropped at rows top..top+out_h, columns left..left+out_w (centred, as pixelSplat's
    ``rescale_and_crop``)."""
    if min(height, width, out_h, out_w) < 1:
        raise ValueError(f'resize_crop: sizes must be positive (image {height}x{width}, out '
                         f'{out_h}x{out_w})')
    scale = max(out_h / height, out_w / width)
    scaled_h, scaled_w = max(out_h, round(height * scale)), max(out_w, round(width * scale))
    return scaled_h, scaled_w, (scaled_h - out_h) // 2, (scaled_w - out_w) // 2


def resize_crop_intrinsics(K: np.ndarray, height: int, width: int, out_h: int, out_w: int
                           ) -> np.ndarray:
    """``K`` [.., 3, 3] (pixels of a height x width image) for the image ``resize_crop`` makes.

    Resizing maps image coordinates (u, v) to (u * sw / width, v * sh / height) (pixel centres
    map to pixel centres: the resamplers' convention); cropping subtracts (left, top). So
    ``K' = [[sx, 0, -left], [0, sy, -top], [0, 0, 1]] @ K`` with sx = sw / width, sy = sh / height:
    exact for any principal point and skew."""
    sh, sw, top, left = resize_crop_geometry(height, width, out_h, out_w)
    image_from_image = np.array([[sw / width, 0.0, -left], [0.0, sh / height, -top],
                                 [0.0, 0.0, 1.0]])
    return image_from_image @ np.asarray(K, np.float64)


def resize_crop_image(image: np.ndarray, out_h: int, out_w: int, resample: str = 'lanczos'
                      ) -> np.ndarray:
    """[h, w, c] (or [h, w]) array resized and cropped as ``resize_crop_geometry`` says.

    ``resample``: 'lanczos' (pixelSplat's filter), 'bilinear' or 'nearest' (labels, masks, depth:
    no value is invented). uint8 images with 1, 3 or 4 channels go through Pillow in one call,
    anything else channel by channel as 32-bit float (nearest: plain indexing)."""
    h, w = image.shape[:2]
    sh, sw, top, left = resize_crop_geometry(h, w, out_h, out_w)
    if resample == 'nearest':  # the source pixel whose area holds the new pixel's centre
        rows = np.minimum(((np.arange(top, top + out_h) + 0.5) * h / sh).astype(np.int64), h - 1)
        cols = np.minimum(((np.arange(left, left + out_w) + 0.5) * w / sw).astype(np.int64), w - 1)
        return image[rows[:, None], cols[None, :]]
    from PIL import Image
    filters = {'lanczos': Image.Resampling.LANCZOS, 'bilinear': Image.Resampling.BILINEAR}
    if resample not in filters:
        raise ValueError(f'resize_crop: resample must be lanczos, bilinear or nearest, not {resample!r}')
    box = (left, top, left + out_w, top + out_h)
    squeeze = image.ndim == 3 and image.shape[2] == 1
    plane = image[..., 0] if squeeze else image
    if plane.dtype == np.uint8 and (plane.ndim == 2 or plane.shape[2] in (3, 4)):
        out = np.asarray(Image.fromarray(plane).resize((sw, sh), filters[resample]).crop(box))
    else:
        chans = plane[..., None] if plane.ndim == 2 else plane
        out = np.stack([np.asarray(Image.fromarray(chans[..., c].astype(np.float32), 'F')
                                   .resize((sw, sh), filters[resample]).crop(box))
                        for c in range(chans.shape[2])], -1).astype(image.dtype)
        out = out[..., 0] if plane.ndim == 2 else out
    return out[..., None] if squeeze else out


def resize_crop(image: np.ndarray, K: np.ndarray, out_h: int, out_w: int,
                resample: str = 'lanczos') -> tuple[np.ndarray, np.ndarray]:
    """(image [out_h, out_w, c], K [3, 3]) of one view resized to cover out_h x out_w and
    centre-cropped; a world point projects onto the same image content before and after."""
    h, w = image.shape[:2]
    return (resize_crop_image(image, out_h, out_w, resample),
            resize_crop_intrinsics(K, h, w, out_h, out_w))


# ----------------------------------------------------------------------------- intrinsics

def normalize_intrinsics(K: np.ndarray, height: int | np.ndarray, width: int | np.ndarray
                         ) -> np.ndarray:
    """pixelSplat's normalised intrinsics ``diag(1/width, 1/height, 1) @ K`` [.., 3, 3]: they map
    camera coordinates to image coordinates divided by the image size, so the centre of pixel
    (row i, column j) is at ((j + 0.5) / width, (i + 0.5) / height). ``height``/``width`` scalars
    or per view [..]."""
    K = np.array(K, np.float64)
    K[..., 0, :] /= np.asarray(width, np.float64)[..., None]
    K[..., 1, :] /= np.asarray(height, np.float64)[..., None]
    return K


# ----------------------------------------------------------------------------- poses

def relative_poses(c2w: np.ndarray, reference: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Poses in the camera frame of view ``reference``: (ref_from_cam [n, 4, 4], ref_from_world
    [4, 4]); ``ref_from_cam = ref_from_world @ world_from_cam``, so view ``reference`` becomes the
    identity. Map world points with ``ref_from_world`` to keep projections unchanged."""
    c2w = np.asarray(c2w, np.float64)
    R, t = c2w[reference, :3, :3], c2w[reference, :3, 3]
    ref_from_world = np.eye(4)
    ref_from_world[:3, :3] = R.T
    ref_from_world[:3, 3] = -R.T @ t
    return ref_from_world @ c2w, ref_from_world


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def lvsm_normalize(c2w: np.ndarray, over: Sequence[int] | None = None,
                   scale_factor: float = 1.35) -> tuple[np.ndarray, np.ndarray, float]:
    """LVSM's pose normalisation (``dataset_scene.py`` ``preprocess_poses``, FORMATS.md 2.3).

    Over the views ``over`` (all by default; LVSM uses all chosen views): ``center`` = mean camera
    position, ``f = unit(mean z)``, ``r = unit(mean y x f)``, ``d = unit(f x r)``,
    ``A = [r d f center]`` (columns, a world_from_mean pose); poses become ``inv(A) @ c2w``, then
    their translations are divided by ``s = scale_factor * max |translation|`` (over ``over``).
    Returns (c2w' [n, 4, 4], norm_from_world [4, 4] = diag(1/s, 1/s, 1/s, 1) @ inv(A) for world
    points, s): projections are unchanged (a similarity of the world)."""
    c2w = np.asarray(c2w, np.float64)
    ref = c2w if over is None else c2w[list(over)]
    center = ref[:, :3, 3].mean(0)
    forward = _unit(ref[:, :3, 2].mean(0))
    right = _unit(np.cross(ref[:, :3, 1].mean(0), forward))
    down = _unit(np.cross(forward, right))
    A = np.eye(4)
    A[:3, :3] = np.stack([right, down, forward], -1)
    A[:3, 3] = center
    mean_from_world = np.linalg.inv(A)
    out = mean_from_world @ c2w
    scale = scale_factor * float(np.abs((mean_from_world @ ref)[:, :3, 3]).max())
    if not scale > 0:
        raise ValueError('lvsm_normalize: all cameras at one position (no scale)')
    out[:, :3, 3] /= scale
    norm_from_world = np.diag([1 / scale, 1 / scale, 1 / scale, 1.0]) @ mean_from_world
    return out, norm_from_world, scale


# ----------------------------------------------------------------------------- render range

def near_far(meta: Mapping[str, Any], manifest: Mapping[str, Any] | None = None
             ) -> tuple[float, float] | None:
    """(near, far) in world units from a scene's ``meta.json`` (else the split manifest's), None
    when neither states one (schema 2 allows null: RE10K-like sources state none)."""
    for source in (meta, manifest or {}):
        near, far = source.get('near'), source.get('far')
        if near is not None and far is not None:
            return float(near), float(far)
    return None
