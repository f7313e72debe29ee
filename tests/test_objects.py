"""The object-aware metrics (issue 14): the generator's object-blind render, the PSNR over object
pixels (srt.metrics.masked_psnr) and how srt/objects.py picks both for an evaluation batch."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from pipeline import synthetic as S
from srt.metrics import MAX_PSNR, masked_psnr, nanmean
from srt.objects import image_scores, object_blind_pixels, object_scores

FMT = 'msn-demo'


def test_object_blind_render_of_an_object_free_scene_equals_the_scene(monkeypatch):
    # A scene the generator samples without any object (same sampling code, zero objects).
    monkeypatch.setitem(S.STYLES, 'empty', dataclasses.replace(S.STYLES['demo'], num_objects=(0, 0)))
    scene = S.sample_scene('empty', seed=3, split='test', index=1)
    assert scene.num_objects == 0
    cams = S.scene_cameras(FMT, 3, 'test', 1)
    full = S.render_views(scene, cams['K'], cams['world_from_cam'], 24, 24)
    blind = S.render_views(S.without_objects(scene), cams['K'], cams['world_from_cam'], 24, 24)
    assert (full['category'] == 0).all()
    np.testing.assert_array_equal(blind['rgb'], full['rgb'])


def test_object_blind_render_keeps_ground_and_sky_and_removes_objects():
    full = S.render_scene(FMT, 0, 'test', 2)
    blind = S.render_scene(FMT, 0, 'test', 2, objects=False)
    assert full['scene'].num_objects >= 1 and blind['scene'].num_objects == 0
    assert (blind['category'] == 0).all() and (blind['object_id'] == 0).all()
    objects = full['category'] > 0
    background = ~objects
    assert objects.any() and background.any()
    same = (full['rgb'] == blind['rgb']).all(axis=-1)
    # Background pixels are exactly the blind render's, except the objects' shadows (darker).
    shadow = background & ~same
    assert same[background].mean() > 0.6
    assert (full['rgb'][shadow].astype(int) <= blind['rgb'][shadow].astype(int)).all()
    # Object pixels show the object, not the ground behind it.
    assert same[objects].mean() < 0.05


def test_demo_rig_is_a_level_ring_around_the_centre():
    cams = S.scene_cameras(FMT, 0, 'train', 5)
    eyes = cams['world_from_cam'][:, :3, 3] - np.array([0.0, 0.0, 0.5])
    np.testing.assert_allclose(np.linalg.norm(eyes, axis=-1), 5.5, atol=1e-4)
    np.testing.assert_allclose(eyes[:, 2], 5.5 * math.sin(math.radians(30)), atol=1e-4)
    az = np.unwrap(np.arctan2(eyes[:, 1], eyes[:, 0]))
    np.testing.assert_allclose(np.abs(np.diff(az)), 2 * math.pi / 10, atol=1e-4)
    assert S.render_scene(FMT, 0, 'train', 5)['rgb'].shape == (10, 32, 32, 3)


def test_masked_psnr_perfect_prediction_is_capped():
    target = torch.rand(2, 50, 3)
    mask = torch.zeros(2, 50, dtype=torch.bool)
    mask[:, :10] = True
    assert torch.equal(masked_psnr(target, target, mask), torch.full((2,), MAX_PSNR))
    assert torch.equal(masked_psnr(target, target), torch.full((2,), MAX_PSNR))


def test_masked_psnr_scores_only_the_masked_pixels():
    target = torch.full((3, 40, 3), 0.5)
    pred = target.clone()
    pred[:, :10] += 0.1  # MSE 0.01 on these pixels: 20 dB
    pred[:, 10:] += 0.3  # a much worse error elsewhere
    mask = torch.zeros(3, 40, dtype=torch.bool)
    mask[:2, :10] = True  # item 2 has no masked pixel
    psnr = masked_psnr(pred, target, mask)
    assert psnr[:2].tolist() == pytest.approx([20.0, 20.0], abs=1e-4)
    assert math.isnan(psnr[2])
    everything = masked_psnr(pred, target)
    assert everything.tolist() == pytest.approx([-10 * math.log10((10 * 0.01 + 30 * 0.09) / 40)] * 3,
                                                abs=1e-4)
    assert nanmean(psnr.tolist()) == pytest.approx(20.0, abs=1e-4)
    assert math.isnan(nanmean([math.nan]))
    scores = image_scores(pred, target, mask, (5, 8))
    assert scores['object_psnr'][:2].tolist() == pytest.approx([20.0, 20.0], abs=1e-4)
    assert scores['ssim'].shape == (3,) and set(scores) == {'psnr', 'object_psnr',
                                                             'background_psnr', 'ssim'}


def test_msn_scene_index():
    assert S.msn_scene_index('scene_500007', 'test') == 7
    assert S.msn_scene_index('scene_12', 'train') == 12
    for bad in ('scene_12', 'frame_500007', 'scene_5x'):
        with pytest.raises(ValueError):
            S.msn_scene_index(bad, 'test')


def test_object_blind_pixels_pick_the_items_target_pixels():
    """A sampled evaluation batch: the blind pixels are the blind render at each target pixel's view
    and (u, v); scoring the true render gives the capped PSNR everywhere."""
    rng = np.random.default_rng(0)
    targets = [1, 4, 7]
    full = S.render_scene(FMT, 0, 'test', 2)
    labels = full['category'][targets].reshape(-1)  # [3 * 32 * 32], the item's pixel order
    flat = np.concatenate([rng.choice(np.flatnonzero(labels > 0), 20),
                           rng.choice(np.flatnonzero(labels == 0), 30)])
    view, rem = np.divmod(flat, 32 * 32)
    v, u = np.divmod(rem, 32)
    batch = {'source_scene': ['scene_500002'], 'source_split': ['test'],
             'target_views': np.array([targets], np.int16), 'target_view': view[None],
             'target_uv': np.stack([u, v], -1)[None], 'target_objects': (labels[flat] > 0)[None]}
    blind = S.render_scene(FMT, 0, 'test', 2, objects=False)['rgb']
    pixels = object_blind_pixels(FMT, 0, batch)
    expected = blind[np.array(targets)[view], v, u] / 255.0
    np.testing.assert_allclose(pixels[0].numpy(), expected, atol=1e-6)
    truth = torch.from_numpy(full['rgb'][np.array(targets)[view], v, u][None] / 255.0).float()
    scores = object_scores(truth, truth, batch, lambda b: object_blind_pixels(FMT, 0, b), None)
    assert scores['object_psnr'].tolist() == [MAX_PSNR]
    assert scores['blind_object_psnr'][0] < scores['blind_psnr'][0] < MAX_PSNR
    assert 'blind_ssim' not in scores  # sampled pixels: no SSIM
