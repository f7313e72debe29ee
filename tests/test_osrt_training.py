"""OSRT trains on MSN-Hard-format shards end to end (toy size): training with FG-ARI in the log,
validation scores, segmentation pictures, evaluation CSV, videos with --segmentation, two DDP ranks;
and evaluation of a reference-format OSRT checkpoint picks the reference's OSRT config."""
import json
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from srt.checkpoint import reference_config_of
from srt.model import build_model
from tests.conftest import ENV, ROOT, losses

# A small OSRT (our size options) with the reference's structure; 2 of MSN-Hard's 10 views as inputs.
TINY_OSRT = {
    'data': {'dataset': 'osrt', 'num_points': 64, 'kwargs': {'num_input_views': 2}},
    'model': {'encoder': 'osrt',
              'encoder_kwargs': {'pos_start_octave': -5, 'num_slots': 4, 'slot_dim': 48,
                                 'num_att_blocks': 1},
              'decoder': 'slot_mixer',
              'decoder_kwargs': {'pos_start_octave': -5, 'num_att_blocks': 1, 'slot_dim': 48,
                                 'hidden_dim': 64}},
    'training': {'batch_size': 2, 'num_workers': 0, 'print_every': 1, 'visualize_every': 2,
                 'validate_every': 2, 'checkpoint_every': 0, 'backup_every': 0, 'max_it': 2,
                 'lr_warmup': 1, 'lr': 3e-4, 'precision': 'fp32', 'shards_per_visit': 2,
                 'item_buffer': 4, 'vis_scenes': 1, 'deterministic': True},
}


def tiny_config(path, **training):
    cfg = json.loads(json.dumps(TINY_OSRT))
    cfg['training'].update(training)
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(*args, **kwargs):
    return subprocess.run([sys.executable, *map(str, args)], env=ENV, cwd=ROOT, check=True,
                          capture_output=True, text=True, timeout=900, **kwargs)


def test_osrt_trains_validates_draws_and_evaluates(msn_hard_shards, tmp_path):
    out = tmp_path / 'run'
    run('-m', 'srt.train', '--shards', msn_hard_shards, '--config', tiny_config(tmp_path / 'c.yaml'),
        '--out', out)
    records = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    train = [r for r in records if 'mse' in r]
    assert [r['it'] for r in train] == [1, 2]
    for r in train:  # the scores are logged, not optimised: the loss is the colour MSE alone
        assert -1 <= r['fg_ari'] <= 1 and -1 <= r['ari'] <= 1 and r['loss'] == r['mse']
    val = [r for r in records if 'val_psnr' in r]
    assert [r['it'] for r in val] == [2] and -1 <= val[0]['val_fg_ari'] <= 1
    # renders-val.png: 2 inputs, 6 renders, the true segmentation, 6 predicted ones, 64 px + 2 pad
    grid = np.asarray(Image.open(out / 'renders-val.png'))
    assert grid.shape == (14 + 66, 15 * 66, 3)
    true_seg = grid[14:78, 8 * 66:8 * 66 + 64].reshape(-1, 3)
    colours = {tuple(c) for c in true_seg}
    assert (0, 0, 0) in colours and len(colours) >= 3  # black background, objects coloured
    assert resolved(out)['training']['init'] == 'reference'

    ev = tmp_path / 'eval'
    result = run('-m', 'srt.evaluate', '--shards', msn_hard_shards, '--checkpoint', out / 'model.pt',
                 '--out', ev)
    assert 'FG-ARI' in result.stdout
    rows = (ev / 'test_scenes.csv').read_text().splitlines()
    # (the generated MSN-Hard scenes store category images: the object metrics follow)
    header = rows[0].split(',')
    assert header[:8] == 'scene_index,scene_key,items,psnr,mse,ssim,ari,fg_ari'.split(',') and \
        len(rows) == 2
    summary = json.loads((ev / 'test_summary.json').read_text())
    assert -1 <= summary['fg_ari'] <= 1 and summary['fg_ari'] == pytest.approx(
        float(rows[1].split(',')[header.index('fg_ari')]), abs=1e-6)

    video = tmp_path / 'video'
    result = run('-m', 'srt.render', '--shards', msn_hard_shards, '--split', 'test', '--checkpoint',
                 out / 'model.pt', '--num-frames', 2, '--height', 16, '--width', 16,
                 '--segmentation', '--out', video)
    assert 'segmentation_video' in result.stdout
    frame = np.asarray(Image.open(video / 'segmentations' / '0000.png'))
    assert frame.shape == (16, 16, 3) and (video / 'segmentation.mp4').stat().st_size > 0
    assert not (frame == 0).all(-1).any()  # slot colours start after black (OSRT's render.py)


def resolved(run_dir):
    return yaml.safe_load((run_dir / 'resolved_config.yaml').read_text())


def test_torchrun_two_cpu_ranks_train_osrt(msn_hard_shards, tmp_path):
    config = tiny_config(tmp_path / 'c.yaml', validate_every=0, visualize_every=0)
    out = tmp_path / 'ddp'
    with socket.socket() as s:  # a free port: other runs of the suite may share this machine
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    run('-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', port, '-m',
        'srt.train', '--shards', msn_hard_shards, '--config', config, '--out', out, '--debug-ddp')
    ranks = json.loads((out / 'ddp_debug.json').read_text())
    assert ranks[0]['param_sum'] == ranks[1]['param_sum']
    assert not set(ranks[0]['scenes']) & set(ranks[1]['scenes'])
    assert sorted(losses(out)) == [1, 2]


@pytest.mark.parametrize('section', [
    {'decoder': 'slot_mixer', 'decoder_kwargs': {'pos_start_octave': -5}},
    {'decoder': 'slot_mixer', 'decoder_kwargs': {'pos_start_octave': -5, 'num_att_blocks': 1,
                                                 'layer_norm': True}},
    {'decoder': 'spatial_broadcast', 'decoder_kwargs': {'pos_start_octave': -5}}])
def test_reference_osrt_checkpoint_gets_the_osrt_config(section):
    """A reference checkpoint has no config: the model is read off its weights."""
    model_section = {'encoder': 'osrt', 'encoder_kwargs': {'pos_start_octave': -5, 'num_slots': 7},
                     **section}
    with torch.device('meta'):
        model = build_model(model_section)
    ckpt = {'encoder': model.encoder.state_dict(), 'decoder': model.decoder.state_dict()}
    raw = reference_config_of(ckpt, 'clevr3d')
    assert raw['data']['dataset'] == 'clevr3d' and raw['data']['kwargs'] == {'downsample': 1}
    with torch.device('meta'):
        again = build_model(raw['model'])
    for part in ('encoder', 'decoder'):
        assert {k: v.shape for k, v in getattr(again, part).state_dict().items()} == \
            {k: v.shape for k, v in ckpt[part].items()}
    with pytest.raises(ValueError, match="no reference config 'nmr/osrt'"):
        reference_config_of(ckpt, 'nmr')
