"""Evaluation CLI agrees with the trainer's validation; every video motion renders a clip."""
import json
import subprocess
import sys

import av
import numpy as np
import pytest
import torch

from pipeline.index import SceneIndex
from pipeline.reader import Scene
from srt.data import DataConfig
from srt.model import ModelConfig, SRT
from srt.video import MOTIONS, render_motion
from tests.conftest import ENV, ROOT, train_cmd, write_config


def test_evaluation_equals_the_trainers_validation(nmr_shards, tmp_path):
    config = write_config(tmp_path / 'tiny.yaml', max_it=2, validate_every=2, checkpoint_every=0,
                          max_eval=1)
    run = tmp_path / 'run'
    subprocess.run(train_cmd(nmr_shards, config, run), env=ENV, cwd=ROOT, check=True,
                   capture_output=True)
    records = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    val = [r for r in records if 'val_psnr' in r]
    assert [r['it'] for r in val] == [2]
    out = subprocess.run([sys.executable, '-m', 'srt.evaluate', '--shards', str(nmr_shards),
                          '--checkpoint', str(run / 'model.pt'), '--split', 'val', '--sampled',
                          '--max-eval', '1', '--out', str(tmp_path / 'eval')],
                         env=ENV, cwd=ROOT, check=True, capture_output=True, text=True)
    summary = json.loads((tmp_path / 'eval/val_summary.json').read_text())
    assert summary['iteration'] == 2 and summary['items'] == 24
    assert abs(summary['psnr'] - val[0]['val_psnr']) < 1e-4
    assert 'LPIPS' in out.stdout  # computed, or the reason it was skipped
    rows = (tmp_path / 'eval/val_scenes.csv').read_text().splitlines()
    assert rows[0].startswith('scene_index,scene_key,items,psnr') and len(rows) == 2


@pytest.mark.parametrize('decoder', ['lightfield', 'nerf'])
def test_every_motion_renders_a_clip(nmr_shards, tmp_path, decoder):
    torch.manual_seed(0)
    small = {'pos_start_octave': -5, 'num_att_blocks': 1}
    model = SRT(ModelConfig(encoder_kwargs={**small, 'num_conv_blocks': 3}, decoder=decoder,
                            decoder_kwargs=small))
    scene = Scene(SceneIndex(str(nmr_shards), 'val').read_sample(0))
    kwargs = {'min_dist': 2.0, 'max_dist': 4.0, 'num_coarse_samples': 4, 'num_fine_samples': 2} \
        if decoder == 'nerf' else {}
    for motion in (MOTIONS if decoder == 'lightfield' else ('rotate',)):
        out = render_motion(model, scene, DataConfig('nmr'), motion, 3, str(tmp_path / motion),
                            height=16, width=20, fade=True, render_kwargs=kwargs)
        with av.open(out['video']) as video:
            frames = [f.to_ndarray(format='rgb24') for f in video.decode(video=0)]
        assert len(frames) == 3 and frames[0].shape == (16, 20, 3)
        assert len(list((tmp_path / motion / 'frames').glob('*.png'))) == 3
        if decoder == 'nerf':
            with av.open(out['depth_video']) as video:
                assert sum(1 for _ in video.decode(video=0)) == 3


def test_motions_move_the_camera_as_described():
    from srt.video import motion_camera
    pos = np.array([3.0, 0.0, 2.0])
    _, start = motion_camera('rotate', pos, 0.0, 8, 8)
    _, quarter = motion_camera('rotate', pos, 0.25, 8, 8)
    np.testing.assert_allclose(quarter[:3, 3], [0.0, 3.0, 2.0], atol=1e-12)
    K0, _ = motion_camera('zoom', pos, 0.0, 8, 8)
    K1, _ = motion_camera('zoom', pos, 0.5, 8, 8)
    assert K1[0, 0] > K0[0, 0]  # a narrower sensor is a longer focal length in pixels
    _, close = motion_camera('closeup', pos, 0.9, 8, 8)
    assert np.linalg.norm(close[:3, 3]) < np.linalg.norm(pos)
    _, roll = motion_camera('eyeroll', pos, 0.3, 8, 8)
    np.testing.assert_allclose(roll[:3, 3], pos)
    assert not np.allclose(roll[:3, 2], start[:3, 2])


def test_render_video_tool_writes_a_playable_mp4(nmr_shards, tmp_path):
    from srt.checkpoint import reference_state_dicts
    from tests.conftest import ROOT
    small = {'pos_start_octave': -5, 'num_att_blocks': 1}
    model = SRT(ModelConfig(encoder_kwargs={**small, 'num_conv_blocks': 3}, decoder_kwargs=small))
    torch.save({**reference_state_dicts(model), 'it': 0}, tmp_path / 'model.pt')
    (tmp_path / 'config.yaml').write_text(
        'data: {dataset: nmr}\nmodel:\n  encoder_kwargs: {pos_start_octave: -5, num_conv_blocks: 3, '
        'num_att_blocks: 1}\n  decoder_kwargs: {pos_start_octave: -5, num_att_blocks: 1}\n')
    proc = subprocess.run([sys.executable, 'tools/render_video.py', '--shards', str(nmr_shards),
                           '--checkpoint', str(tmp_path / 'model.pt'), '--config',
                           str(tmp_path / 'config.yaml'), '--split', 'val', '--scene', '0',
                           '--motion', 'zoom', '--num-frames', '3', '--height', '16', '--width',
                           '16', '--out', str(tmp_path / 'video')], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with av.open(str(tmp_path / 'video/video.mp4')) as video:
        assert sum(1 for _ in video.decode(video=0)) == 3


def test_video_of_a_volumetric_model_uses_the_configured_sample_counts(nmr_shards, tmp_path):  # noqa: F811
    from PIL import Image

    from srt.checkpoint import reference_state_dicts
    from srt.render import main as render_main
    from srt.video import load_scene
    torch.manual_seed(0)
    small = {'pos_start_octave': -5, 'num_att_blocks': 1}
    model = SRT(ModelConfig(encoder_kwargs={**small, 'num_conv_blocks': 3}, decoder='nerf',
                            decoder_kwargs=small))
    torch.save({**reference_state_dicts(model), 'it': 0}, tmp_path / 'model.pt')
    (tmp_path / 'config.yaml').write_text(
        'data: {dataset: nmr}\nmodel:\n  encoder_kwargs: {pos_start_octave: -5, num_conv_blocks: 3, '
        'num_att_blocks: 1}\n  decoder: nerf\n  decoder_kwargs: {pos_start_octave: -5, '
        'num_att_blocks: 1}\ntraining: {num_coarse_samples: 3, num_fine_samples: 2}\n')
    args = ['--shards', nmr_shards, '--checkpoint', tmp_path / 'model.pt', '--config',
            tmp_path / 'config.yaml', '--scene', '0', '--num-frames', '2', '--height', '8',
            '--width', '8', '--out', tmp_path / 'cli']
    assert render_main(list(map(str, args))) == 0

    def frames(directory):
        return [np.asarray(Image.open(directory / 'frames' / f'{f:04d}.png')) for f in range(2)]
    scene = load_scene(str(nmr_shards), 'val', '0')
    near_far = {'min_dist': 2.0, 'max_dist': 4.0}  # NMR's render range (its meta.json)
    for name, counts in (('configured', {'num_coarse_samples': 3, 'num_fine_samples': 2}),
                         ('defaults', {})):  # the decoder's own 128 + 64
        render_motion(model, scene, DataConfig('nmr'), 'rotate', 2, str(tmp_path / name), 8, 8,
                      render_kwargs={**near_far, **counts})
    cli = frames(tmp_path / 'cli')
    assert all(np.array_equal(a, b) for a, b in zip(cli, frames(tmp_path / 'configured')))
    assert not all(np.array_equal(a, b) for a, b in zip(cli, frames(tmp_path / 'defaults')))


def test_a_full_image_metric_like_lpips_is_scored_per_item(nmr_shards):
    # srt.evaluate hands lpips_metric's function to evaluate(); a stand-in (mean absolute error)
    # shows it receives whole [n, h, w, 3] images and lands in the records and the summary
    from srt.evaluate import evaluate
    from srt.loader import EvalStream, shard_table
    torch.manual_seed(0)
    small = {'pos_start_octave': -5, 'num_att_blocks': 1}
    model = SRT(ModelConfig(encoder_kwargs={**small, 'num_conv_blocks': 3}, decoder_kwargs=small))
    stream = EvalStream(DataConfig('nmr', full_scale=True), shard_table(str(nmr_shards), 'val'), 2,
                        max_scenes=1)
    shapes = []

    def mae(a, b):
        shapes.append(tuple(a.shape))
        return (a - b).abs().mean(dim=(1, 2, 3))
    summary, records = evaluate(model, stream, 'cpu', {}, full_scale=True, lpips=mae)
    assert shapes and all(s[1:] == (64, 64, 3) for s in shapes)
    assert all(0 < r['lpips'] < 1 for r in records)
    assert summary['lpips'] == pytest.approx(np.mean([r['lpips'] for r in records]))
