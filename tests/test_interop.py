"""Every row of the camera-interop table in docs/SHARDS.md, checked against the target convention
re-implemented from its documentation: the converted camera must see each world point at the same
pixel (or give the same ray) as the stored K + c2w."""
import numpy as np
import pytest

from pipeline import cameras as C

H, W = 48, 64


def random_camera(seed):
    rng = np.random.default_rng(seed)
    c2w = C.look_at(rng.normal(size=3) * 4 + [0, 0, 3], rng.normal(size=3) * 0.3)
    K = np.array([[rng.uniform(40, 90), 0, W / 2 + rng.normal() * 3],
                  [0, rng.uniform(40, 90), H / 2 + rng.normal() * 3], [0, 0, 1]])
    return K, c2w, rng


def points_in_view(K, c2w, rng, n=50):
    """World points in front of the camera with their pixel coordinates (our convention)."""
    uv = rng.uniform([0, 0], [W, H], size=(n, 2))
    o, d = C.rays_from_image_points(K, c2w, uv)
    return o + d * rng.uniform(1, 5, size=(n, 1)), uv


@pytest.mark.parametrize('seed', range(3))
def test_world_to_camera(seed):
    K, c2w, rng = random_camera(seed)
    X, uv = points_in_view(K, c2w, rng)
    w2c = np.linalg.inv(c2w)
    cam = X @ w2c[:3, :3].T + w2c[:3, 3]
    np.testing.assert_allclose(cam[:, :2] / cam[:, 2:] @ K[:2, :2].T + K[:2, 2], uv, atol=1e-8)


@pytest.mark.parametrize('seed', range(3))
def test_opengl_nerfstudio(seed):
    K, c2w, rng = random_camera(seed)
    c2w_gl = c2w @ np.diag([1, -1, -1, 1])
    fl_x, fl_y, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    # nerfstudio's Cameras.generate_rays: pixel centres at +0.5, camera looks down -z, y up.
    v, u = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing='ij')
    d_cam = np.stack([(u - cx) / fl_x, -(v - cy) / fl_y, -np.ones_like(u)], -1)
    d = d_cam @ c2w_gl[:3, :3].T
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    np.testing.assert_allclose(d, C.image_rays(K, c2w, H, W)[1], atol=1e-10)
    np.testing.assert_allclose(c2w_gl[:3, 3], c2w[:3, 3])
    assert abs(K[0, 1]) < 1e-12  # the table's fl/c entries assume no skew (sources have none)


@pytest.mark.parametrize('seed', range(3))
def test_pixelsplat(seed):
    K, c2w, rng = random_camera(seed)
    intr = K / np.array([[W], [H], [1]])
    w2c = np.linalg.inv(c2w)[:3]
    row = np.array([intr[0, 0], intr[1, 1], intr[0, 2], intr[1, 2], 0, 0, *w2c.ravel()])
    # pixelSplat: coordinates normalised to [0, 1] with pixel centres at (i + 0.5) / size,
    # directions = inv(K_normalised) [x, y, 1], rotated by c2w = inverse of the 3x4 w2c.
    fx, fy, cx, cy = row[:4]
    K_n = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]])
    w2c4 = np.eye(4)
    w2c4[:3] = row[6:].reshape(3, 4)
    c2w_ps = np.linalg.inv(w2c4)
    v, u = np.meshgrid((np.arange(H) + 0.5) / H, (np.arange(W) + 0.5) / W, indexing='ij')
    d = np.stack([u, v, np.ones_like(u)], -1) @ np.linalg.inv(K_n).T @ c2w_ps[:3, :3].T
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    np.testing.assert_allclose(d, C.image_rays(K, c2w, H, W)[1], atol=1e-10)
    np.testing.assert_allclose(c2w_ps[:3, 3], c2w[:3, 3], atol=1e-10)


@pytest.mark.parametrize('seed', range(3))
def test_lvsm(seed):
    K, c2w, rng = random_camera(seed)
    fxfycxcy = [K[0, 0], K[1, 1], K[0, 2], K[1, 2]]
    w2c = np.linalg.inv(c2w)
    X, uv = points_in_view(K, c2w, rng)
    cam = X @ w2c[:3, :3].T + w2c[:3, 3]
    fx, fy, cx, cy = fxfycxcy
    proj = np.stack([fx * cam[:, 0] / cam[:, 2] + cx, fy * cam[:, 1] / cam[:, 2] + cy], -1)
    np.testing.assert_allclose(proj, uv, atol=1e-8)


@pytest.mark.parametrize('seed', range(3))
def test_pytorch3d(seed):
    K, c2w, rng = random_camera(seed)
    w2c = np.linalg.inv(c2w)
    R = (np.diag([-1, -1, 1]) @ w2c[:3, :3]).T
    T = np.diag([-1, -1, 1]) @ w2c[:3, 3]
    s = min(H, W) / 2
    focal = np.array([K[0, 0] / s, K[1, 1] / s])
    principal = np.array([-(K[0, 2] - W / 2) / s, -(K[1, 2] - H / 2) / s])
    X, uv = points_in_view(K, c2w, rng)
    # PyTorch3D: row vectors X_view = X_world @ R + T (+X left, +Y up, +Z forward); NDC projection
    # x_ndc = f * X / Z + p; NDC -> screen: u = W/2 - s * x_ndc, v = H/2 - s * y_ndc.
    view = X @ R + T
    assert np.all(view[:, 2] > 0)
    ndc = focal * view[:, :2] / view[:, 2:] + principal
    screen = np.stack([W / 2 - s * ndc[:, 0], H / 2 - s * ndc[:, 1]], -1)
    np.testing.assert_allclose(screen, uv, atol=1e-8)
