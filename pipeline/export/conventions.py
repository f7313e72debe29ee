"""Camera conventions of the export targets, as small pure functions (docs/EXPORT.md).

Ours (docs/CONVENTIONS.md): ``K`` [3, 3] in pixels with pixel centres at +0.5 (pixel (row i,
column j) is centred at image point (j + 0.5, i + 0.5)), ``c2w`` [4, 4] world_from_cam with OpenCV
camera axes (+x right, +y down, +z forward), the source's world frame and units.
"""
from __future__ import annotations

import numpy as np


def pixelsplat_row(K: np.ndarray, c2w: np.ndarray, height: int, width: int) -> np.ndarray:
    """pixelSplat's camera row [18] float64 of one view: fx/W, fy/H, cx/W, cy/H, 0, 0, then the
    world-to-camera 3x4 row-major, OpenCV axes (pixelSplat ``dataset_re10k.py:179-200``).

    ``K`` [3, 3] pixels of the written ``height`` x ``width`` image, ``c2w`` [4, 4]. The intrinsics
    are normalised by the image's own size; pixelSplat's pixel (i, j) sits at ((j + 0.5) / W,
    (i + 0.5) / H), so no half-pixel shift is needed."""
    # The flip: pixelSplat stores world-to-camera (its loader inverts it back to c2w).
    w2c = np.linalg.inv(np.asarray(c2w, np.float64))
    row = np.zeros(18)
    row[:4] = K[0, 0] / width, K[1, 1] / height, K[0, 2] / width, K[1, 2] / height
    row[6:] = w2c[:3].reshape(-1)
    return row


def lvsm_frame_camera(K: np.ndarray, c2w: np.ndarray) -> tuple[list[float], list[list[float]]]:
    """LVSM's ``fxfycxcy`` (pixels of the written image) and ``w2c`` (4x4 OpenCV world-to-camera)
    of one view (LVSM ``data/dataset_scene.py:79-94``, rays ``utils/data_utils.py:67-77`` with pixel
    centres at +0.5: ours)."""
    # The flip: LVSM stores world-to-camera and inverts it at load time.
    w2c = np.linalg.inv(np.asarray(c2w, np.float64))
    w2c[3] = (0.0, 0.0, 0.0, 1.0)  # exact, as LVSM's preprocessing writes it
    return [float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2])], w2c.tolist()


# OpenCV camera axes (+y down, +z forward) <-> OpenGL (+y up, looking down -z): negate y and z columns.
CV_FROM_GL = np.diag([1.0, -1.0, -1.0, 1.0])


def opengl_c2w(c2w: np.ndarray) -> np.ndarray:
    """nerfstudio's ``transform_matrix`` [4, 4]: camera-to-world with OpenGL camera axes, from our
    OpenCV ``c2w`` [4, 4] (same world; nerfstudio ``cameras.py:656,783-787`` flips y and looks
    down -z)."""
    # The flip: the camera's y and z axes change sign (columns 1 and 2); the world is unchanged.
    return np.asarray(c2w, np.float64) @ CV_FROM_GL
