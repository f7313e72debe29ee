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
  kwargs: {downsample: 1, num_input_views: 2, canonical_view: false}
model:
  encoder: isrt
  encoder_kwargs: {num_conv_blocks: 3, num_att_blocks: 1}
  decoder: lightfield
  decoder_kwargs: {num_att_blocks: 1}
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
    for name in ('trained', 'iteration_0', 'mean_training_image'):
        assert summary[name]['scenes'] == 2 and 0 < summary[name]['psnr'] < 60, name
    assert summary['trained']['psnr'] != summary['iteration_0']['psnr']  # it did train
    for line in ('SRT, trained', 'SRT, iteration 0', 'mean training image', 'video.mp4'):
        assert line in first.stdout
    for path in ('run/renders-val.png', 'run/metrics.jsonl', 'contact_sheet.png',
                 'shards/train.manifest.json'):
        assert (out / path).stat().st_size > 0, path
    with av.open(str(out / 'video/video.mp4')) as container:
        assert sum(1 for _ in container.decode(video=0)) == 4
    # Rerunning reuses the rendered source and the finished run.
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert 'exists, reused' in again.stdout
    assert json.loads((out / 'summary.json').read_text())['iterations'] == 4
