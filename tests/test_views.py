"""View samplers against their definitions (pixelSplat's bounded sampler, LVSM's, evaluation
index files, SRT's rules) and camera transforms by projecting points: the same world point lands
on the same image content before and after."""
import types

import numpy as np
import pytest

from pipeline import camtransforms as ct
from pipeline.views import (AllViews, BoundedSampler, EachViewAsInput, EvaluationIndex, LVSMSampler,
                            RandomInputs, SkipScene)


def scene(n, key='k'):
    return types.SimpleNamespace(num_views=n, key=key)


# ----------------------------------------------------------------------------- samplers

@pytest.mark.parametrize('step', [0, 30_000, 75_000, 149_999, 150_000, 400_000])
def test_bounded_sampler_gaps_follow_the_warm_up_and_targets_stay_inside_the_span(step):
    s = BoundedSampler()  # pixelSplat's RE10K settings: gap 25 -> 45 over 150k steps
    want = min(25 + int(20 * step / 150_000), 45)  # schedule(initial, final), both ends
    assert s.gap_bounds(300, step) == (want, want)
    wide = BoundedSampler(min_distance_between_context_views=20, max_distance_between_context_views=60,
                          initial_min_distance_between_context_views=5,
                          initial_max_distance_between_context_views=10, warm_up_steps=1000,
                          num_context_views=4, min_distance_to_context_views=2)
    lo, hi = (min(5 + int(15 * step / 1000), 20), min(10 + int(50 * step / 1000), 60))
    rng, dupes = np.random.default_rng(step), 0
    for _ in range(300):
        c = wide(scene(40), rng, step)
        left, right = c.context[0], c.context[-1]
        assert lo <= right - left <= min(hi, 39) and 0 <= left and right < 40
        assert len(c.context) == 4 and len(set(c.context)) == 4
        assert all(left < e < right for e in c.context[1:-1])
        assert len(c.target) == 4 and all(left + 2 <= t <= right - 2 for t in c.target)
        dupes += len(set(c.target)) < 4
    assert dupes > 0  # targets are drawn with replacement


def test_bounded_sampler_test_stage_too_short_scenes_and_circular_cameras():
    s = BoundedSampler(stage='test', max_distance_between_context_views=10)
    c = s(scene(30), np.random.default_rng(0), 0)
    assert c.context == (0, 10) and c.target == tuple(range(11))
    with pytest.raises(SkipScene) as e:
        s(scene(10), np.random.default_rng(0), 0)  # 10 views cannot hold a gap of 10
    assert e.value.reason == 'too_short'
    with pytest.raises(SkipScene, match='too_short'):
        BoundedSampler()(scene(20), np.random.default_rng(0), 0)
    circ = BoundedSampler(circular=True, warm_up_steps=0, min_distance_between_context_views=8,
                          max_distance_between_context_views=8)
    for seed in range(50):
        c = circ(scene(10), np.random.default_rng(seed), 0)
        assert (c.context[1] - c.context[0]) % 10 == 8 and all(0 <= t < 10 for t in c.target)


def test_lvsm_sampler_endpoints_first_unsorted_interior_targets_from_all_views():
    s = LVSMSampler(min_frame_dist=8, max_frame_dist=12)
    rng, unsorted, input_targets = np.random.default_rng(1), 0, 0
    for _ in range(300):
        c = s(scene(20), rng, 0)
        start, end, *inner = c.span
        assert 8 <= end - start <= 12 and len(c.span) == 8 and len(set(c.span)) == 8
        assert all(start < v < end for v in inner)
        unsorted += inner != sorted(inner)
        assert c.context == (start, end)
        assert len(c.target) == 6 and len(set(c.target)) == 6 and set(c.target) <= set(c.span)
        input_targets += bool(set(c.target) & set(c.context))
    assert unsorted > 0 and input_targets > 0
    last = LVSMSampler(min_frame_dist=6, max_frame_dist=12, num_views=5, num_target_views=3,
                       target_has_input=False)(scene(20), rng, 0)
    assert last.target == last.span[2:]
    for n in (7, 12):  # fewer views than num_views; a frame distance range that is empty
        with pytest.raises(SkipScene, match='too_short'):
            LVSMSampler(min_frame_dist=11)(scene(n), rng, 0)


def test_evaluation_index_exact_format_null_missing_and_out_of_range():
    index = EvaluationIndex({'a': {'context': [0, 4], 'target': [1, 2, 3]}, 'b': None,
                             'c': {'context': [0, 9], 'target': [1]}})
    assert index(scene(5, 'a')).context == (0, 4) and index(scene(5, 'a')).target == (1, 2, 3)
    assert index.nulls == 1
    for key, reason in (('b', 'null_in_index'), ('zz', 'not_in_index'), ('c', 'index_out_of_range')):
        with pytest.raises(SkipScene) as e:
            index(scene(5, key))
        assert e.value.reason == reason
    for bad in ({'a': {'context': [0], 'target': [1], 'extra': []}}, {'a': {'context': [0.5],
                                                                            'target': []}}, [1]):
        with pytest.raises(ValueError, match='evaluation index'):
            EvaluationIndex(bad)


def test_all_views():
    assert AllViews()(scene(4), None) == AllViews()(scene(4), None, 9, 2)
    choice = AllViews()(scene(4), None)
    assert choice.context == (0, 1, 2, 3) and choice.target == ()
    assert AllViews(targets=True)(scene(3), None).target == (0, 1, 2)


def test_srt_reference_rules():
    rng = np.random.default_rng(0)
    c = RandomInputs(3)(scene(10), rng)
    assert len(set(c.context)) == 3 and c.target == tuple(v for v in range(10) if v not in c.context)
    assert RandomInputs(3, 'all')(scene(10), rng).target == tuple(range(10))
    assert EachViewAsInput()(scene(4), rng, 0, 2).context == (2,)
    assert EachViewAsInput()(scene(4), rng, 0, 2).target == (0, 1, 3)
    assert EachViewAsInput('all')(scene(4), rng, 0, 2).target == (0, 1, 2, 3)


# ----------------------------------------------------------------------------- camera transforms

def random_camera(rng, h, w):
    """K with an off-centre principal point and a pose looking at the origin region."""
    K = np.array([[rng.uniform(50, 90), 0.3, w * rng.uniform(0.3, 0.7)],
                  [0, rng.uniform(50, 90), h * rng.uniform(0.3, 0.7)], [0, 0, 1]])
    a = rng.normal(size=3)
    R, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    R *= np.sign(np.linalg.det(R))
    c2w = np.eye(4)
    c2w[:3, :3], c2w[:3, 3] = R, a
    return K, c2w


def project(K, c2w, X):
    """Image coordinates [n, 2] of world points X [n, 3] (pixel centres at +0.5)."""
    Xc = (np.linalg.inv(c2w) @ np.c_[X, np.ones(len(X))].T)[:3].T
    uv = (K @ (Xc / Xc[:, 2:]).T).T
    return uv[:, :2]


def points_in_view(rng, K, c2w, h, w, n=20, margin=12):
    uv = np.c_[rng.uniform(margin, w - margin, n), rng.uniform(margin, h - margin, n)]
    depth = rng.uniform(2, 6, n)
    Xc = (np.linalg.inv(K) @ np.c_[uv, np.ones(n)].T).T * depth[:, None]
    return (c2w @ np.c_[Xc, np.ones(n)].T)[:3].T


def test_resize_crop_keeps_points_on_their_image_content():
    rng = np.random.default_rng(3)
    h, w, out_h, out_w = 90, 160, 48, 48
    K, c2w = random_camera(rng, h, w)
    X = points_in_view(rng, K, c2w, h, w, n=6, margin=30)
    image = np.zeros((h, w, 3), np.uint8)
    uv = project(K, c2w, X)
    for u, v in uv:  # a bright 5x5 square centred on each projected point
        image[int(v) - 2:int(v) + 3, int(u) - 2:int(u) + 3] = 255
    out, K2 = ct.resize_crop(image, K, out_h, out_w)
    assert out.shape == (out_h, out_w, 3)
    uv2 = project(K2, c2w, X)
    sh, sw, top, left = ct.resize_crop_geometry(h, w, out_h, out_w)
    np.testing.assert_allclose(uv2, uv * [sw / w, sh / h] - [left, top], atol=1e-9)
    found = 0
    for (u, v), (u0, v0) in zip(uv2, uv):
        if not (3 < u < out_w - 3 and 3 < v < out_h - 3):
            continue  # cropped away
        r0, c0 = int(v) - 3, int(u) - 3
        patch = out[r0:r0 + 7, c0:c0 + 7, 0].astype(float)
        rows, cols = np.mgrid[r0:r0 + 7, c0:c0 + 7] + 0.5
        centre = ((cols * patch).sum() / patch.sum(), (rows * patch).sum() / patch.sum())
        square = (np.floor(u0) + 0.5) * sw / w - left, (np.floor(v0) + 0.5) * sh / h - top
        np.testing.assert_allclose(centre, square, atol=0.15)  # the square's centre, moved by K
        found += 1
    assert found >= 2
    nearest = ct.resize_crop_image(image[..., :1], out_h, out_w, 'nearest')
    assert nearest.shape == (out_h, out_w, 1) and set(np.unique(nearest)) <= {0, 255}


def test_normalized_intrinsics_relative_and_lvsm_poses_keep_projections():
    rng = np.random.default_rng(5)
    h, w = 40, 60
    cams = [random_camera(rng, h, w) for _ in range(4)]
    K = np.stack([k for k, _ in cams])
    c2w = np.stack([p for _, p in cams])
    X = points_in_view(rng, K[0], c2w[0], h, w)
    uv = np.stack([project(K[i], c2w[i], X) for i in range(4)])
    Kn = ct.normalize_intrinsics(K, h, w)
    np.testing.assert_allclose(project(Kn[1], c2w[1], X), uv[1] / [w, h], atol=1e-12)
    rel, ref_from_world = ct.relative_poses(c2w, 0)
    np.testing.assert_allclose(rel[0], np.eye(4), atol=1e-12)
    Xr = X @ ref_from_world[:3, :3].T + ref_from_world[:3, 3]
    for i in range(4):
        np.testing.assert_allclose(project(K[i], rel[i], Xr), uv[i], atol=1e-8)
    norm, norm_from_world, s = ct.lvsm_normalize(c2w, over=[0, 1, 2], scale_factor=1.35)
    Xn = X @ norm_from_world[:3, :3].T + norm_from_world[:3, 3]
    for i in range(4):
        np.testing.assert_allclose(project(K[i], norm[i], Xn), uv[i], atol=1e-8)
    # LVSM's definition over the chosen views: mean position at the origin, the mean forward axis
    # along +z, the mean down axis in the y-z plane, the largest translation 1 / 1.35
    np.testing.assert_allclose(norm[:3, :3, 3].mean(0), 0, atol=1e-12)
    f = norm[:3, :3, 2].mean(0)
    np.testing.assert_allclose(f / np.linalg.norm(f), [0, 0, 1], atol=1e-12)
    assert abs(norm[:3, :3, 1].mean(0)[0]) < 1e-12
    assert np.isclose(np.abs(norm[:3, :3, 3]).max(), 1 / 1.35)
    assert ct.near_far({'near': 2, 'far': 4}) == (2.0, 4.0)
    assert ct.near_far({'near': None, 'far': None}, {'near': 1, 'far': 9}) == (1.0, 9.0)
    assert ct.near_far({}) is None
