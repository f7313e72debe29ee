"""docs/SHARDS.md's readers and camera interop. First each target convention, re-implemented from
its documentation, on random cameras: the converted camera must see each world point at the same
pixel (or give the same ray) as the stored K + c2w. Then each function of the doc's interop block on
converted shards, fed to the consumer's own parsing (re-implemented from its code, file:line
cited)."""
import ast
import io
import json
import warnings

import numpy as np
import pytest
import torch

from pipeline import cameras as C
from pipeline.convert import ConvertConfig, convert
from pipeline.reader import Scene, iter_shard, shard_urls
from pipeline.schema import rgb_member
from tests.conftest import ROOT, TESTVECTORS

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


# ----------------------------------------------------------------------------- on our shards
# Each function of docs/SHARDS.md's interop block, run on converted shards (NMR: RGB 64x64, 24
# views; CLEVR3D: RGBA 240x320, 3 views) and fed to the consumer's own parsing, re-implemented below
# from its code (read at nerfstudio-project/nerfstudio 50e0e3c7, dcharatan/pixelsplat 32b1b66,
# Haian-Jin/LVSM 2fea924, facebookresearch/pytorch3d 9381c401).

DOC = ROOT / 'docs' / 'SHARDS.md'


def doc_block(marker: str) -> tuple[dict, str]:
    """Execute the ```python block between <!-- marker:start/end --> of docs/SHARDS.md."""
    text = DOC.read_text()
    code = text.split(f'<!-- {marker}:start -->')[1].split(f'<!-- {marker}:end -->')[0]
    code = code.split('```python')[1].split('```')[0]
    namespace: dict = {}
    exec(compile(code, str(DOC), 'exec'), namespace)
    return namespace, code


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp('interop')
    for dataset in ('nmr', 'clevr3d'):
        convert(ConvertConfig(dataset=dataset, src=str(TESTVECTORS / 'sources' / dataset),
                              out=str(out / dataset), splits=['train'], progress=False))
    return out


def first_scene(shards, dataset) -> Scene:
    return Scene(next(iter_shard(shard_urls(str(shards / dataset), 'train')[0])))


DOC_API = doc_block('interop')[0]
DATASETS = ['nmr', 'clevr3d']


def test_the_docs_reader_is_ten_lines_and_reads_rgb(shards):
    ns, code = doc_block('reader')
    scenes = next(n for n in ast.parse(code).body if getattr(n, 'name', '') == 'scenes')
    assert scenes.end_lineno - scenes.lineno + 1 <= 10
    ours = first_scene(shards, 'clevr3d')
    key, meta, images, K, c2w = next(ns['scenes'](shard_urls(str(shards / 'clevr3d'), 'train')[0]))
    assert key == ours.key and meta == ours.meta
    np.testing.assert_array_equal(images, ours.images())  # RGBA read as RGB
    o, d = ns['rays'](K[1], c2w[1], ours.height, ours.width)
    o_ref, d_ref = C.image_rays(ours.K[1], ours.c2w[1], ours.height, ours.width)
    np.testing.assert_allclose(d, d_ref, atol=1e-12)
    np.testing.assert_allclose(o, o_ref, atol=1e-12)


@pytest.mark.parametrize('dataset', DATASETS)
def test_w2c_opencv_projects_our_rays_back_to_their_pixels(shards, dataset):
    scene = first_scene(shards, dataset)
    rng = np.random.default_rng(1)
    for v in range(scene.num_views):
        uv = rng.uniform([0, 0], [scene.width, scene.height], size=(20, 2))
        o, d = C.rays_from_image_points(scene.K[v], scene.c2w[v], uv)
        X = o + d * rng.uniform(0.5, 5, size=(20, 1))
        w2c = DOC_API['w2c_opencv'](scene.c2w[v])
        cam = X @ w2c[:3, :3].T + w2c[:3, 3]
        K = scene.K[v]
        np.testing.assert_allclose(cam[:, :2] / cam[:, 2:] @ K[:2, :2].T + K[:2, 2], uv, atol=1e-8)


def _nerfstudio_cameras(meta, orientation_method, center_method, auto_scale_poses):
    """nerfstudio's ``Nerfstudio._generate_dataparser_outputs`` (nerfstudio/data/dataparsers/
    nerfstudio_dataparser.py) on a transforms.json dict, as far as cameras go."""
    names = [f['file_path'] for f in meta['frames']]
    frames = [meta['frames'][i] for i in np.argsort(names)]  # :124-131, sorted by file name
    for frame in frames:  # :137-154: no top-level intrinsics, so every frame must carry them
        for key, what in (('fl_x', 'fx'), ('fl_y', 'fy'), ('cx', 'cx'), ('cy', 'cy'),
                          ('h', 'height'), ('w', 'width')):
            assert key in frame, f'{what} not specified in frame'
    poses = torch.from_numpy(np.array([f['transform_matrix'] for f in frames]).astype(np.float32))
    # nerfstudio/cameras/camera_utils.py:587-598 and 653-657 (auto_orient_and_center_poses; the
    # 'up'/'pca' rotations are not re-implemented: the test uses 'none')
    assert orientation_method == 'none'
    mean_origin = poses[..., :3, 3].mean(0)
    translation = mean_origin if center_method == 'poses' else torch.zeros_like(mean_origin)
    transform = torch.eye(4)
    transform[:3, 3] = -translation
    poses = transform[:3] @ poses
    scale_factor = 1.0  # nerfstudio_dataparser.py:244-249
    if auto_scale_poses:
        scale_factor /= float(torch.max(torch.abs(poses[:, :3, 3])))
    poses[:, :3, 3] *= scale_factor
    intrinsics = [torch.tensor([float(f[k]) for f in frames]) for k in ('fl_x', 'fl_y', 'cx', 'cy')]
    size = [torch.tensor([int(f[k]) for f in frames]) for k in ('h', 'w')]  # :273-278
    return poses, intrinsics, size


def _nerfstudio_rays(c2w, fx, fy, cx, cy, height, width):
    """nerfstudio/cameras/cameras.py: get_image_coords (:317-318, (y, x) + 0.5) and the perspective
    branch of _generate_rays_from_coords (:622, :656, :785-787, :889-898)."""
    y, x = (torch.stack(torch.meshgrid(torch.arange(height), torch.arange(width), indexing='ij'),
                        -1) + 0.5).unbind(-1)
    coord = torch.stack([(x - cx) / fx, (y - cy) / fy], -1)
    coord[..., 1] *= -1  # OpenCV to OpenGL
    directions = torch.stack([coord[..., 0], coord[..., 1], -torch.ones_like(x)], -1)
    directions = torch.sum(directions[..., None, :] * c2w[:3, :3], dim=-1)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    return c2w[:3, 3].expand_as(directions), directions


@pytest.mark.parametrize('dataset', DATASETS)
def test_nerfstudio_parser_gives_our_rays_with_the_documented_settings(shards, dataset):
    scene = first_scene(shards, dataset)
    H, W = scene.height, scene.width
    frames = [DOC_API['nerfstudio_frame'](scene.K[v], scene.c2w[v], H, W, f'images/{v:03d}.png')
              for v in reversed(range(scene.num_views))]  # any order: nerfstudio sorts by name
    meta = json.loads(json.dumps({'frames': frames}))  # as written to transforms.json
    poses, (fx, fy, cx, cy), (h, w) = _nerfstudio_cameras(meta, 'none', 'none', False)
    for v in range(scene.num_views):
        o, d = _nerfstudio_rays(poses[v], fx[v], fy[v], cx[v], cy[v], int(h[v]), int(w[v]))
        o_ref, d_ref = C.image_rays(scene.K[v], scene.c2w[v], H, W)
        np.testing.assert_allclose(d.numpy(), d_ref, atol=2e-6)
        np.testing.assert_allclose(o.numpy(), o_ref, atol=1e-5)
    # Its defaults move and scale the world (what the doc warns about): centred, scaled into +-1.
    moved, _, _ = _nerfstudio_cameras(meta, 'none', 'poses', True)
    assert torch.max(torch.abs(moved[:, :3, 3])) == pytest.approx(1.0)
    assert not np.allclose(moved[:, :3, 3].numpy(), scene.c2w[:, :3, 3], atol=1e-2)


def _pixelsplat_example(rows, pngs):
    """pixelsplat src/dataset/dataset_re10k.py: convert_poses (:179-200) and convert_images
    (:203-210) of one chunk example {'cameras': [V, 18], 'images': PNG bytes as uint8 tensors}."""
    from PIL import Image
    from torchvision.transforms import ToTensor
    poses = torch.tensor(np.asarray(rows), dtype=torch.float32)
    b = poses.shape[0]
    intrinsics = torch.eye(3).repeat(b, 1, 1)
    fx, fy, cx, cy = poses[:, :4].T
    intrinsics[:, 0, 0], intrinsics[:, 1, 1] = fx, fy
    intrinsics[:, 0, 2], intrinsics[:, 1, 2] = cx, cy
    w2c = torch.eye(4).repeat(b, 1, 1)
    w2c[:, :3] = poses[:, 6:].reshape(b, 3, 4)
    images = torch.stack([ToTensor()(Image.open(io.BytesIO(t.numpy().tobytes()))) for t in pngs])
    return w2c.inverse(), intrinsics, images


def _pixelsplat_rays(extrinsics, intrinsics, h, w):
    """pixelsplat src/geometry/projection.py: sample_image_grid (:117-137, (x, y) = (index + 0.5) /
    size) and get_world_rays (:91-114 with unproject :74-88 and transform_cam2world :31-36)."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
    xy = torch.stack([(cols + 0.5) / w, (rows + 0.5) / h], -1)
    directions = torch.cat([xy, torch.ones_like(xy[..., :1])], -1) @ intrinsics.inverse().T
    directions = directions / directions.norm(dim=-1, keepdim=True)
    directions = torch.cat([directions, torch.zeros_like(directions[..., :1])], -1) @ extrinsics.T
    return extrinsics[:-1, -1].broadcast_to(directions[..., :3].shape), directions[..., :3]


@pytest.mark.parametrize('dataset', DATASETS)
def test_pixelsplat_loader_gives_our_rays_and_drops_what_the_doc_says(shards, dataset):
    scene = first_scene(shards, dataset)
    H, W = scene.height, scene.width
    rows = [DOC_API['pixelsplat_row'](scene.K[v], scene.c2w[v], H, W)
            for v in range(scene.num_views)]
    pngs = [torch.from_numpy(np.frombuffer(scene.sample[rgb_member(v)], np.uint8).copy())
            for v in range(scene.num_views)]
    extrinsics, intrinsics, images = _pixelsplat_example(rows, pngs)
    for v in range(scene.num_views):
        o, d = _pixelsplat_rays(extrinsics[v], intrinsics[v], H, W)
        o_ref, d_ref = C.image_rays(scene.K[v], scene.c2w[v], H, W)
        np.testing.assert_allclose(d.numpy(), d_ref, atol=2e-6)
        np.testing.assert_allclose(o.numpy(), o_ref, atol=1e-5)
    # RGBA keeps its alpha (4 channels); the loader's shape check (dataset_re10k.py:131-132)
    # drops every example that is not 3 x 360 x 640, as the doc says.
    assert images.shape == (scene.num_views, 4 if dataset == 'clevr3d' else 3, H, W)
    np.testing.assert_allclose(images[0, :3].permute(1, 2, 0).numpy(), scene.image(0) / 255,
                               atol=1e-6)
    assert images.shape[1:] != (3, 360, 640)


def _lvsm_scene(data_json, image_size, patch_size):
    """LVSM data/dataset_scene.py: preprocess_frames (:54-95), without square_crop."""
    import PIL.Image
    images, intrinsics = [], []
    for frame in data_json['frames']:
        image = PIL.Image.open(frame['image_path'])
        original_w, original_h = image.size
        resize_h = image_size
        resize_w = int(resize_h / original_h * original_w)
        resize_w = int(round(resize_w / patch_size) * patch_size)
        image = image.resize((resize_w, resize_h), resample=PIL.Image.LANCZOS)
        images.append(torch.from_numpy(np.array(image) / 255.0).permute(2, 0, 1).float())
        fxfycxcy = np.array(frame['fxfycxcy'])
        fxfycxcy *= (resize_w / original_w, resize_h / original_h) * 2
        intrinsics.append(torch.from_numpy(fxfycxcy).float())
    c2ws = np.linalg.inv(np.stack([np.array(f['w2c']) for f in data_json['frames']]))
    return torch.stack(images), torch.stack(intrinsics), torch.from_numpy(c2ws).float()


def _lvsm_rays(c2w, fxfycxcy):
    """LVSM utils/data_utils.py ProcessData.compute_rays (:38-82), one view, h and w not given."""
    fx, fy, cx, cy = fxfycxcy
    h, w = int(2 * cy.item()), int(2 * cx.item())  # :54-57: the image size from the principal point
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
    x, y = (x + 0.5 - cx) / fx, (y + 0.5 - cy) / fy  # :71-72
    ray_d = torch.stack([x, y, torch.ones_like(x)], -1) @ c2w[:3, :3].T  # :73-75
    ray_d = ray_d / torch.norm(ray_d, dim=-1, keepdim=True)
    return c2w[:3, 3].expand_as(ray_d), ray_d


def _lvsm_preprocess_poses(c2ws, scene_scale_factor=1.35):
    """LVSM data/dataset_scene.py preprocess_poses (:97-131)."""
    import torch.nn.functional as F
    center = c2ws[:, :3, 3].mean(0)
    forward = F.normalize(c2ws[:, :3, 2].mean(0), dim=-1)
    down = c2ws[:, :3, 1].mean(0)
    right = F.normalize(torch.cross(down, forward, dim=-1), dim=-1)
    down = F.normalize(torch.cross(forward, right, dim=-1), dim=-1)
    avg = torch.eye(4)
    avg[:3, :3] = torch.stack([right, down, forward], -1)
    avg[:3, 3] = center
    c2ws = torch.linalg.inv(avg) @ c2ws
    c2ws[:, :3, 3] /= scene_scale_factor * torch.max(torch.abs(c2ws[:, :3, 3]))
    return c2ws


@pytest.mark.parametrize('dataset', DATASETS)
def test_lvsm_loader_gives_our_rays_and_keeps_rgba(shards, dataset, tmp_path):
    scene = first_scene(shards, dataset)
    H, W = scene.height, scene.width
    frames = []
    for v in range(scene.num_views):
        path = tmp_path / f'{v:05d}.png'
        path.write_bytes(scene.sample[rgb_member(v)])
        frames.append(DOC_API['lvsm_frame'](scene.K[v], scene.c2w[v], str(path)))
    data_json = json.loads(json.dumps({'scene_name': scene.key, 'frames': frames}))
    images, fxfycxcy, c2ws = _lvsm_scene(data_json, image_size=H, patch_size=8)  # no resizing
    assert images.shape == (scene.num_views, 4 if dataset == 'clevr3d' else 3, H, W)
    for v in range(scene.num_views):
        o, d = _lvsm_rays(c2ws[v], fxfycxcy[v])
        o_ref, d_ref = C.image_rays(scene.K[v], scene.c2w[v], H, W)
        np.testing.assert_allclose(d.numpy(), d_ref, atol=2e-6)
        np.testing.assert_allclose(o.numpy(), o_ref, atol=1e-5)
    moved = _lvsm_preprocess_poses(c2ws)  # what the doc warns about: re-centred and re-scaled
    assert torch.max(torch.abs(moved[:, :3, 3])).item() == pytest.approx(1 / 1.35, rel=1e-5)


def _pytorch3d_from_opencv(R, tvec, camera_matrix, image_size):
    """pytorch3d/renderer/camera_conversions.py _cameras_from_opencv_projection (:21-60)."""
    focal_length = torch.stack([camera_matrix[:, 0, 0], camera_matrix[:, 1, 1]], dim=-1)
    principal_point = camera_matrix[:, :2, 2]
    image_size_wh = image_size.to(R).flip(dims=(1,))
    scale = (image_size_wh.min(dim=1, keepdim=True)[0] / 2.0).expand(-1, 2)
    c0 = image_size_wh / 2.0
    R_pytorch3d, T_pytorch3d = R.clone().permute(0, 2, 1), tvec.clone()
    R_pytorch3d[:, :, :2] *= -1
    T_pytorch3d[:, :2] *= -1
    return dict(R=R_pytorch3d, T=T_pytorch3d, focal_length=focal_length / scale,
                principal_point=-(principal_point - c0) / scale, image_size=image_size)


def _pytorch3d_screen(cam, X):
    """pytorch3d/renderer/cameras.py transform_points_screen (:359-363): world_to_view (:1564-1600,
    X @ R + T), the perspective calibration (:1542-1554), NDC to screen with the camera's
    image_size (:360; without one it raises, :1792-1794; :1806-1813) and the xy flip
    (:1820-1829)."""
    view = X @ cam['R'][0] + cam['T'][0]
    (fx, fy), (px, py) = cam['focal_length'][0], cam['principal_point'][0]
    ndc = torch.stack([fx * view[:, 0] / view[:, 2] + px, fy * view[:, 1] / view[:, 2] + py], -1)
    height, width = (float(x) for x in torch.as_tensor(cam['image_size']).view(-1, 2)[0])
    scale = min(height, width) / 2.0
    return torch.stack([-(scale * ndc[:, 0] - width / 2.0),
                        -(scale * ndc[:, 1] - height / 2.0)], -1)


@pytest.mark.parametrize('dataset', DATASETS)
def test_pytorch3d_cameras_see_our_points_at_our_pixels(shards, dataset):
    scene = first_scene(shards, dataset)
    H, W = scene.height, scene.width
    rng = np.random.default_rng(2)
    for v in range(scene.num_views):
        doc = DOC_API['pytorch3d_cameras'](scene.K[v], scene.c2w[v], H, W)
        w2c = torch.tensor(np.linalg.inv(scene.c2w[v]))[None]
        theirs = _pytorch3d_from_opencv(w2c[:, :3, :3], w2c[:, :3, 3],
                                        torch.tensor(scene.K[v])[None], torch.tensor([[H, W]]))
        for name in ('R', 'T', 'focal_length', 'principal_point', 'image_size'):
            np.testing.assert_allclose(np.asarray(doc[name], np.float64),
                                       theirs[name].numpy().astype(np.float64), atol=1e-12)
        uv = rng.uniform([0, 0], [W, H], size=(30, 2))
        o, d = C.rays_from_image_points(scene.K[v], scene.c2w[v], uv)
        X = torch.tensor(o + d * rng.uniform(0.5, 5, size=(30, 1)))
        cam = {k: torch.as_tensor(np.asarray(x, np.float64)) for k, x in doc.items()}
        np.testing.assert_allclose(_pytorch3d_screen(cam, X).numpy(), uv, atol=1e-8)


def test_webdataset_decodes_rgb_floats_without_warnings(shards):
    ours = first_scene(shards, 'clevr3d')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        samples = list(DOC_API['webdataset_samples'](shard_urls(str(shards / 'clevr3d'), 'train')))
    assert not [w for w in caught if 'shardshuffle' in str(w.message)]
    first = samples[0]
    assert first['__key__'] == ours.key and first['meta.json'] == ours.meta
    image = first['rgb_000.png']
    assert image.dtype == np.float32 and image.shape == (240, 320, 3)  # RGBA: alpha dropped
    assert 0.0 <= image.min() and image.max() <= 1.0
    np.testing.assert_allclose(image, ours.image(0) / np.float32(255), atol=1e-7)
    np.testing.assert_array_equal(first['cameras.npz']['c2w'], ours.c2w)


def test_hugging_face_keeps_rgba_and_convert_gives_our_pixels(shards, tmp_path):
    ours = first_scene(shards, 'clevr3d')
    ds = DOC_API['hf_dataset'](shard_urls(str(shards / 'clevr3d'), 'train'), str(tmp_path / 'hf'))
    row = next(r for r in ds if r['__key__'] == ours.key)
    assert row['rgb_000.png'].mode == 'RGBA'
    np.testing.assert_array_equal(np.asarray(row['rgb_000.png'].convert('RGB')), ours.image(0))


def test_meta_source_nesting_is_as_documented(shards):
    nmr = first_scene(shards, 'nmr').meta['source']
    clevr = first_scene(shards, 'clevr3d').meta['source']
    assert set(nmr) == {'class_id', 'scene_name', 'world_rotation', 'note'}
    assert set(clevr) == {'num_objects', 'metadata'}
    with np.load(TESTVECTORS / 'sources/clevr3d/metadata.npz') as metadata:
        assert set(clevr['metadata']) == set(metadata.files)  # the scene's row of every array
    doc = DOC.read_text()
    for text in ('`class_id`, `scene_name`, `world_rotation`', '`note`',
                 '`num_objects`; `metadata` {'):
        assert text in doc
