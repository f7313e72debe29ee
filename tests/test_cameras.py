"""Camera convention: properties over random poses, source round trips and reference parity."""
import json

import numpy as np
import pytest
import torch

from pipeline import cameras as C
from tests.conftest import TESTVECTORS

REF = TESTVECTORS / 'reference'
SRC = TESTVECTORS / 'sources'
TOL = 1e-5


def random_pose(rng) -> np.ndarray:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    R = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                  [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                  [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, rng.normal(size=3) * 5
    return T


def random_K(rng, h, w) -> np.ndarray:
    f = rng.uniform(50, 300)
    return np.array([[f * rng.uniform(0.9, 1.1), rng.uniform(-1, 1), w / 2 + rng.normal()],
                     [0, f, h / 2 + rng.normal()], [0, 0, 1]])


def project(K, world_from_cam, points):
    cam = C.transform_points(points, C.invert_pose(world_from_cam))
    img = cam @ K.T
    return img[..., :2] / img[..., 2:]


@pytest.mark.parametrize('seed', range(5))
def test_rays_unit_and_reproject_to_their_pixels(seed):
    rng = np.random.default_rng(seed)
    h, w = 7, 9
    K, pose = random_K(rng, h, w), random_pose(rng)
    origins, dirs = C.image_rays(K, pose, h, w)
    assert dirs.shape == (h, w, 3)
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=-1), 1.0, atol=1e-12)
    np.testing.assert_allclose(origins, np.broadcast_to(pose[:3, 3], origins.shape))
    depth = rng.uniform(1, 10, size=(h, w, 1))
    uv = project(K, pose, origins + depth * dirs)
    np.testing.assert_allclose(uv, C.pixel_centers(h, w), atol=1e-8)
    # The camera looks along +z: a point in front has positive camera-frame depth.
    cam = C.transform_points(origins + depth * dirs, C.invert_pose(pose))
    assert np.all(cam[..., 2] > 0)


def test_pixel_rays_equal_image_rays_and_batches():
    rng = np.random.default_rng(0)
    Ks = np.stack([random_K(rng, 5, 6) for _ in range(3)])
    poses = np.stack([random_pose(rng) for _ in range(3)])
    _, dirs = C.image_rays(Ks, poses, 5, 6)
    assert dirs.shape == (3, 5, 6, 3)
    rows, cols = rng.integers(0, 5, 20), rng.integers(0, 6, 20)
    for i in range(3):
        _, d = C.pixel_rays(Ks[i], poses[i], rows, cols)
        np.testing.assert_allclose(d, dirs[i, rows, cols], atol=1e-12)


def test_opencv_axes_pixel_centre_convention():
    K = np.array([[10.0, 0, 2.0], [0, 10.0, 1.0], [0, 0, 1]])
    _, d = C.image_rays(K, np.eye(4), 2, 4)
    # Pixel (v=0, u=0) has centre (0.5, 0.5): left of and above the principal point (2, 1).
    assert d[0, 0, 0] < 0 and d[0, 0, 1] < 0 and d[0, 0, 2] > 0
    # Pixel centre (2.5, 1.5) is right of and below it: OpenCV x right, y down.
    assert d[1, 2, 0] > 0 and d[1, 2, 1] > 0


def test_transforms_and_inverse():
    rng = np.random.default_rng(3)
    a_from_b = random_pose(rng)
    b_from_a = C.invert_pose(a_from_b)
    np.testing.assert_allclose(a_from_b @ b_from_a, np.eye(4), atol=1e-12)
    p = rng.normal(size=(10, 3))
    np.testing.assert_allclose(C.transform_points(C.transform_points(p, a_from_b), b_from_a), p,
                               atol=1e-12)
    d = rng.normal(size=(10, 3))
    np.testing.assert_allclose(np.linalg.norm(C.transform_directions(d, a_from_b), axis=-1),
                               np.linalg.norm(d, axis=-1))


def test_torch_twins_match_numpy():
    rng = np.random.default_rng(4)
    K, pose = random_K(rng, 6, 8), random_pose(rng)
    _, d = C.image_rays(K, pose, 6, 8)
    dt = C.image_rays_torch(torch.tensor(K), torch.tensor(pose), 6, 8)
    np.testing.assert_allclose(dt.numpy(), d, atol=1e-12)
    T = random_pose(rng)
    p = rng.normal(size=(2, 5, 3))
    pt = C.transform_points_torch(torch.tensor(p), torch.tensor(np.stack([T, T])))
    np.testing.assert_allclose(pt.numpy(), C.transform_points(p, T), atol=1e-12)


def test_look_at_is_level_and_points_at_target():
    pose = C.look_at([3.0, -4.0, 2.0], [0.0, 0.0, 0.0])
    x, y, z = pose[:3, 0], pose[:3, 1], pose[:3, 2]
    assert abs(x[2]) < 1e-12  # horizontal image axis is level
    assert y[2] < 0  # image "down" points down in the world (z up)
    np.testing.assert_allclose(z, -np.array([3.0, -4.0, 2.0]) / np.sqrt(29))


@pytest.mark.parametrize('seed', range(3))
def test_source_camera_round_trips(seed):
    rng = np.random.default_rng(seed)
    pose = C.look_at(rng.normal(size=3) * 3 + [0, 0, 4], [0, 0, 0])
    # NMR: DVR matrices and back.
    K = np.array([[70.0, 0, 32], [0, 70.0, 32], [0, 0, 1]])
    mats = C.opencv_to_nmr(K, pose, 64, 64)
    np.testing.assert_allclose(mats['world_mat'] @ mats['world_mat_inv'], np.eye(4), atol=1e-12)
    K2, pose2 = C.nmr_to_opencv(mats['world_mat_inv'], mats['camera_mat_inv'], 64, 64)
    np.testing.assert_allclose(K2, K, atol=1e-9)
    np.testing.assert_allclose(pose2, pose, atol=1e-12)
    # sunds: extrinsics and back.
    R, t = C.opencv_to_sunds(pose)
    _, pose3 = C.sunds_to_opencv(K, R, t)
    np.testing.assert_allclose(pose3, pose, atol=1e-12)
    # ObSuRF: the camera is defined by its position; look-at recovers the pose.
    _, pose4 = C.obsurf_to_opencv(pose[:3, 3])
    np.testing.assert_allclose(pose4, pose, atol=1e-12)


def test_reference_nmr_grid_reproduced_by_K():
    """The edge-to-edge grid of NMR's reference, written out independently."""
    cams = np.load(SRC / 'nmr/02958343/scene00007/cameras.npz')
    K, pose = C.nmr_to_opencv(cams['world_mat_inv_3'], cams['camera_mat_inv_3'], 64, 64)
    x, y = np.meshgrid(np.linspace(-1, 1, 64), np.linspace(-1, 1, 64))
    d = np.stack([x, y, np.ones_like(x), np.zeros_like(x)], -1)
    d = d @ (C.NMR_WORLD_ROTATION @ cams['world_mat_inv_3'] @ cams['camera_mat_inv_3']).T
    d = d[..., :3] / np.linalg.norm(d[..., :3], axis=-1, keepdims=True)
    np.testing.assert_allclose(C.image_rays(K, pose, 64, 64)[1], d, atol=1e-12)


# ----------------------------------------------------------------------------- reference parity

def _index():
    return json.loads((REF / 'index.json').read_text())


def _nmr_view(scene: str, view: int):
    cams = np.load(SRC / 'nmr' / scene / 'cameras.npz')
    return C.nmr_to_opencv(cams[f'world_mat_inv_{view}'], cams[f'camera_mat_inv_{view}'], 64, 64)


def _clevr_view(scene: int, view: int):
    return C.obsurf_to_opencv(np.load(SRC / 'clevr3d/metadata.npz')['camera_pos'][scene, view])


def _check_world_and_canonical(name, cam_of_view, input_view, rule, h, w):
    world = np.load(REF / f'{name}_world.npz')
    canon = np.load(REF / f'{name}_canonical.npz')
    K, pose = cam_of_view(input_view)
    _, d = C.image_rays(K, pose, h, w)
    assert np.abs(d - world['input_rays'][0]).max() <= TOL
    assert np.abs(pose[:3, 3] - world['input_camera_pos'][0]).max() <= TOL
    T = C.canonical_from_world(rule, K, pose, h, w)
    assert np.abs(T - canon['transform']).max() <= TOL
    assert np.abs(C.transform_directions(d, T) - canon['input_rays'][0]).max() <= TOL
    assert np.abs(C.transform_points(pose[:3, 3], T) - canon['input_camera_pos'][0]).max() <= TOL


@pytest.mark.parametrize('item', [0, 11])
def test_nmr_parity(item):
    info = _index()[f'nmr_train_item{item}_canonical.npz']
    _check_world_and_canonical(f'nmr_train_item{item}', lambda v: _nmr_view(info['scene'], v),
                               info['input_view'], 'input_view_pose', 64, 64)


@pytest.mark.parametrize('item', [0, 5])
def test_clevr3d_parity(item):
    info = _index()[f'clevr3d_train_item{item}_canonical.npz']
    _check_world_and_canonical(f'clevr3d_train_item{item}', lambda v: _clevr_view(info['scene'], v),
                               info['input_view'], 'look_at_origin', 240, 320)


def _msn_cameras(scene: str):
    from tests.conftest import read_msn_test_cameras
    return read_msn_test_cameras()[scene]


@pytest.mark.parametrize('scene', ['scene_7', 'scene_8'])
def test_msn_sunds_rays_parity(scene):
    cams = _msn_cameras(scene)
    ref = np.load(REF / f'msn_train_{scene}_sunds_world_rays.npz')
    o, d = C.image_rays(cams['K'], cams['world_from_cam'], 128, 128)
    assert np.abs(d - ref['ray_directions']).max() <= TOL
    assert np.abs(o - ref['ray_origins']).max() <= TOL


@pytest.mark.parametrize('scene', ['scene_7', 'scene_8'])
@pytest.mark.parametrize('perm', ['01234', '30791'])
def test_msn_canonical_parity(scene, perm):
    cams = _msn_cameras(scene)
    _check_world_and_canonical(
        f'msn_train_{scene}_inputs{perm}',
        lambda v: (cams['K'][v], cams['world_from_cam'][v]), int(perm[0]),
        'center_columns_rays', 128, 128)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize('K, message', [
    (np.eye(2), 'shape'),
    (np.array([[np.nan, 0, 1], [0, 1, 1], [0, 0, 1]]), 'non-finite'),
    (np.array([[0.0, 0, 1], [0, 0, 1], [0, 0, 1]]), 'singular'),
    (np.array([[1.0, 0, 1], [0, 1, 1], [0, 1, 1]]), 'last row'),
])
def test_bad_intrinsics_rejected(K, message):
    with pytest.raises(ValueError, match=message):
        C.image_rays(K, np.eye(4), 2, 2)


@pytest.mark.parametrize('pose, message', [
    (np.eye(3), 'shape'),
    (np.full((4, 4), np.inf), 'non-finite'),
    (np.diag([1.0, 1.0, 0.0, 1.0]), 'singular'),
    (np.diag([2.0, 1.0, 1.0, 1.0]), 'orthonormal'),
    (np.diag([-1.0, 1.0, 1.0, 1.0]), 'det -1'),
])
def test_bad_pose_rejected(pose, message):
    with pytest.raises(ValueError, match=message):
        C.image_rays(np.eye(3), pose, 2, 2)


def test_bad_canonical_rule_rejected():
    with pytest.raises(ValueError, match='canonical-frame rule'):
        C.canonical_from_world('nope', np.eye(3), np.eye(4), 2, 2)


@pytest.mark.parametrize('rule', ['input_view_pose', 'look_at_origin', 'center_columns_rays'])
def test_checked_cameras_skip_only_the_checks(rule):
    """``checked=True`` (a Scene's already-validated float64 cameras) gives the same arrays."""
    rng = np.random.default_rng(11)
    for h, w in ((64, 64), (45, 80), (7, 3)):
        K, pose = random_K(rng, h, w), random_pose(rng)
        want = C.canonical_from_world(rule, K, pose, h, w)
        np.testing.assert_array_equal(C.canonical_from_world(rule, K, pose, h, w, checked=True), want)
        # the result is still the rule's frame: the unchecked list form agrees with it
        np.testing.assert_array_equal(C.canonical_from_world(rule, K.tolist(), pose.tolist(), h, w),
                                      want)
    poses = np.stack([random_pose(rng) for _ in range(5)])
    np.testing.assert_array_equal(C.invert_pose(poses, checked=True), C.invert_pose(poses))
    np.testing.assert_array_equal(C.invert_pose(poses[0], checked=True), C.invert_pose(poses[0]))
    np.testing.assert_allclose(C.invert_pose(poses, checked=True) @ poses,
                               np.broadcast_to(np.eye(4), poses.shape), atol=1e-12)
