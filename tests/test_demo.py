"""The README's demo command (tools/demo.py), end to end at toy size: every step it runs, the
summary it prints and the files it promises (the full-size run is measured in the README)."""
import json
import subprocess
import sys

import av

from tests.conftest import ROOT

TINY = """
data:
  dataset: msn
  num_points: 64
  kwargs: {num_input_views: 2}
model:
  encoder: isrt
  encoder_kwargs: {num_conv_blocks: 3, num_att_blocks: 1, latent_dim: 192, conv_dim: 16,
                   pos_octaves: 4, ray_octaves: 4}
  decoder: lightfield
  decoder_kwargs: {num_att_blocks: 1, latent_dim: 192, pos_octaves: 4, ray_octaves: 4}
training:
  batch_size: 2
  num_workers: 0
  print_every: 2
  visualize_every: 4
  validate_every: 4
  checkpoint_every: 2
  max_it: 4
  lr_warmup: 2
  max_eval: 2
  vis_scenes: 1
  init: he
"""


def test_demo_end_to_end_tiny(tmp_path):
    config = tmp_path / 'tiny.yaml'
    config.write_text(TINY)
    out = tmp_path / 'demo'
    cmd = [sys.executable, 'tools/demo.py', '--out', str(out), '--scenes', '20', '--config',
           str(config), '--max-eval', '2', '--frames', '4']
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['iterations'] == 4 and summary['video_frames_decoded'] == 4
    for name in ('trained', 'iteration_0', 'mean_training_image', 'object_blind'):
        assert summary[name]['scenes'] == 2 and 0 < summary[name]['psnr'] < 60, name
        assert 0 < summary[name]['object_psnr'] < 60 and 0 < summary[name]['ssim'] <= 1, name
    assert summary['trained']['psnr'] != summary['iteration_0']['psnr']  # it did train
    # The object-blind render is exact off the objects (shadows aside), so it beats them there.
    assert summary['object_blind']['psnr'] > summary['object_blind']['object_psnr']
    assert summary['object_psnr_over_object_blind_db'] == (summary['trained']['object_psnr']
                                                           - summary['object_blind']['object_psnr'])
    assert set(summary['stage_seconds']) == {'render', 'convert', 'train', 'evaluate', 'video'}
    for line in ('SRT, trained', 'SRT, iteration 0', 'mean training image', 'object-blind render',
                 'objects (dB)', 'over the object-blind render', 'video.mp4'):
        assert line in first.stdout
    for path in ('heldout.png', 'heldout_scenes.csv', 'run/renders-val.png', 'run/metrics.jsonl',
                 'contact_sheet.png', 'shards/train.manifest.json'):
        assert (out / path).stat().st_size > 0, path
    header = (out / 'heldout_scenes.csv').read_text().splitlines()[0].split(',')
    assert {'psnr', 'object_psnr', 'ssim', 'blind_psnr', 'blind_object_psnr'} <= set(header)
    # python -m srt.evaluate reports the same object metrics on the same held-out items.
    ev = subprocess.run([sys.executable, '-m', 'srt.evaluate', '--shards', str(out / 'shards'),
                         '--checkpoint', str(out / 'run/model.pt'), '--max-eval', '2', '--out',
                         str(tmp_path / 'eval')], cwd=ROOT, capture_output=True, text=True)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert 'object-blind render' in ev.stdout
    result = json.loads((tmp_path / 'eval/test_summary.json').read_text())
    for key, (name, demo_key) in {'object_psnr': ('trained', 'object_psnr'),
                                  'blind_psnr': ('object_blind', 'psnr'),
                                  'blind_object_psnr': ('object_blind', 'object_psnr')}.items():
        assert abs(result[key] - summary[name][demo_key]) < 1e-3, key
    with av.open(str(out / 'video/video.mp4')) as container:
        assert sum(1 for _ in container.decode(video=0)) == 4
    # Rerunning reuses the rendered source and the finished run.
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert 'exists, reused' in again.stdout
    assert json.loads((out / 'summary.json').read_text())['iterations'] == 4
