"""The trainer: exact resume after SIGKILL, DDP on CPU with gloo, reference checkpoints, bad input."""
import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import torch
import yaml

from tests.conftest import ENV, ROOT, TESTVECTORS, TINY_TRAIN, losses, train_cmd, write_config


def test_sigkill_mid_run_resumes_exactly(nmr_shards, tmp_path):
    config = write_config(tmp_path / 'tiny.yaml')
    subprocess.run(train_cmd(nmr_shards, config, tmp_path / 'straight'), env=ENV, cwd=ROOT,
                   check=True, capture_output=True)
    want = losses(tmp_path / 'straight')
    assert sorted(want) == list(range(1, 10))

    run = tmp_path / 'killed'
    proc = subprocess.Popen(train_cmd(nmr_shards, config, run), env=ENV, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill after the checkpoint at it 3, mid-way to the next
        if (run / 'metrics.jsonl').exists() and len(losses(run)) >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = max(losses(run))
    assert 4 <= done < 9, 'the kill must land mid-run'
    ckpt = torch.load(run / 'model.pt', weights_only=True)
    assert ckpt['it'] in (3 * (done // 3), 3 * (done // 3) - 3) and ckpt['it'] >= 3
    result = subprocess.run(train_cmd(nmr_shards, config, run), env=ENV, cwd=ROOT, check=True,
                            capture_output=True, text=True)
    assert f'at iteration {ckpt["it"]}' in result.stdout
    assert losses(run) == want  # same LR and loss at every iteration, resumed ones included


def test_reference_checkpoint_loads_and_training_continues(nmr_shards, tmp_path):
    """A reference-format checkpoint of the full srt architecture, built from the key list."""
    shapes = {}
    for line in (TESTVECTORS.parent / 'reference_state_dict_keys.txt').read_text().splitlines():
        if line.startswith('srt '):
            _, part, key, shape = line.split(' ', 3)
            shapes.setdefault(part, {})[key] = eval(shape)  # "(1, 768, 15, 20)"
    g = torch.Generator().manual_seed(0)
    ckpt = {part: {k: torch.randn(s, generator=g) * 0.02 for k, s in d.items()}
            for part, d in shapes.items()}
    ckpt.update(it=40, epoch_it=0, t=1.0, loss_val_best=20.0, run_id=None)
    run = tmp_path / 'run'
    run.mkdir()
    torch.save(ckpt, run / 'model.pt')
    cfg = json.loads(json.dumps(TINY_TRAIN))
    cfg['model'] = {'encoder_kwargs': {'pos_start_octave': -5}, 'decoder': 'lightfield',
                    'decoder_kwargs': {'pos_start_octave': -5}}
    cfg['training'].update(max_it=42, batch_size=1, lr_warmup=2500)
    config = tmp_path / 'srt.yaml'
    config.write_text(yaml.safe_dump(cfg))
    out = subprocess.run(train_cmd(nmr_shards, config, run), env=ENV, cwd=ROOT, check=True,
                         capture_output=True, text=True)
    assert 'reference checkpoint) at iteration 40' in out.stdout
    assert sorted(losses(run)) == [41, 42]
    after = torch.load(run / 'model.pt', weights_only=True)
    assert after['it'] == 42 and after['format'] == 'srt-shards/1'
    assert set(after['encoder']) == set(ckpt['encoder'])
    assert not torch.equal(after['decoder']['ray_predictor.output_mlp.2.bias'],
                           ckpt['decoder']['ray_predictor.output_mlp.2.bias'])


def test_torchrun_two_cpu_ranks_keep_identical_parameters_on_disjoint_scenes(nmr_shards, tmp_path):
    config = write_config(tmp_path / 'tiny.yaml', max_it=3, checkpoint_every=0, num_workers=0)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port',
           '29517', '-m', 'srt.train', '--shards', str(nmr_shards), '--config', str(config),
           '--out', str(tmp_path / 'ddp'), '--debug-ddp']
    subprocess.run(cmd, env=ENV, cwd=ROOT, check=True, capture_output=True, timeout=600)
    ranks = json.loads((tmp_path / 'ddp/ddp_debug.json').read_text())
    assert [r['rank'] for r in ranks] == [0, 1]
    assert ranks[0]['param_sum'] == ranks[1]['param_sum']
    assert ranks[0]['param_abs_sum'] == ranks[1]['param_abs_sum']
    assert ranks[0]['scenes'] and ranks[1]['scenes']
    assert not set(ranks[0]['scenes']) & set(ranks[1]['scenes'])
    assert sorted(losses(tmp_path / 'ddp')) == [1, 2, 3]
    # A global batch that the world size does not divide is refused before the first step.
    bad = write_config(tmp_path / 'odd.yaml', batch_size=3)
    cmd[cmd.index(str(config))] = str(bad)
    proc = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and 'not divisible by the world size 2' in proc.stderr


def test_training_never_imports_tensorflow(nmr_shards, tmp_path):
    config = write_config(tmp_path / 'tiny.yaml', max_it=1, num_workers=0)
    code = ('import sys; from srt import train\n'
            f'train.main({["--shards", str(nmr_shards), "--config", str(config), "--out", str(tmp_path / "r")]!r})\n'
            "print('TF', any(m.split('.')[0] == 'tensorflow' for m in sys.modules))")
    out = subprocess.run([sys.executable, '-c', code], env=ENV, cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert 'TF False' in out.stdout


def _run_fail(args):
    proc = subprocess.run([sys.executable, '-m', 'srt.train', *map(str, args)], env=ENV, cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode != 0
    return proc.stderr


def test_bad_input_is_refused_before_the_first_step(nmr_shards, tmp_path):
    config = write_config(tmp_path / 'tiny.yaml', max_it=1)
    assert 'no such shard directory' in _run_fail(['--shards', tmp_path / 'nope'])
    (tmp_path / 'empty').mkdir()
    assert 'no manifest for split' in _run_fail(['--shards', tmp_path / 'empty'])
    old = tmp_path / 'old'
    shutil.copytree(nmr_shards, old)
    manifest = json.loads((old / 'train.manifest.json').read_text())
    manifest['schema_version'] = 99
    (old / 'train.manifest.json').write_text(json.dumps(manifest))
    assert 'schema version 99' in _run_fail(['--shards', old, '--config', config])
    msn = json.loads(json.dumps(TINY_TRAIN))
    msn['data']['dataset'] = 'msn'
    (tmp_path / 'msn.yaml').write_text(yaml.safe_dump(msn))
    assert "config is for dataset 'msn'" in _run_fail(['--shards', nmr_shards, '--config',
                                                        tmp_path / 'msn.yaml'])
    run = tmp_path / 'run'
    subprocess.run(train_cmd(nmr_shards, config, run), env=ENV, cwd=ROOT, check=True,
                   capture_output=True)
    other = write_config(tmp_path / 'other.yaml', max_it=2, batch_size=4)
    err = _run_fail(['--shards', nmr_shards, '--config', other, '--out', run])
    assert 'training.batch_size: checkpoint 2, now 4' in err


def test_readme_flags_stream_from_a_url_checkpoint_accumulate_and_evaluate(nmr_shards, tmp_path):
    # The README's training options against a plain run: streaming the shards through a `pipe:`
    # URL and activation checkpointing train exactly the same model.
    config = write_config(tmp_path / 'tiny.yaml', max_it=3, checkpoint_every=0)
    subprocess.run(train_cmd(nmr_shards, config, tmp_path / 'plain'), env=ENV, cwd=ROOT,
                   check=True, capture_output=True)
    run = tmp_path / 'flags'
    proc = subprocess.run(train_cmd(nmr_shards, config, run, '--shard-url',
                                    f'pipe:cat {nmr_shards}/{{name}}', '--activation-checkpointing',
                                    '--evalnow', '--visnow', '--test', '--max-eval', 1,
                                    '--print-model'),
                          env=ENV, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = losses(tmp_path / 'plain')
    assert sorted(want) == [1, 2, 3]
    np.testing.assert_allclose(list(losses(run).values()), list(want.values()), rtol=1e-5,
                               atol=1e-8)
    records = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    evals = [r for r in records if any(k.endswith('_psnr') for k in r)]
    assert evals and evals[0]['it'] == 0  # --evalnow: before the first step
    assert list(run.glob('renders-*.png'))  # --visnow
    assert 'encoder.' in proc.stdout + proc.stderr  # --print-model
    # --full-scale changes the evaluation only; training still samples num_points rays (it once
    # trained on full images).
    full = tmp_path / 'full'
    subprocess.run(train_cmd(nmr_shards, config, full, '--full-scale'), env=ENV, cwd=ROOT,
                   check=True, capture_output=True)
    np.testing.assert_allclose(list(losses(full).values()), list(want.values()), rtol=1e-5,
                               atol=1e-8)
    # --grad-accum splits each global batch of 2 into micro-batches of 1 (other batches, so other
    # losses): it runs the same number of optimizer steps.
    accum = tmp_path / 'accum'
    subprocess.run(train_cmd(nmr_shards, config, accum, '--grad-accum', 2), env=ENV, cwd=ROOT,
                   check=True, capture_output=True)
    got = losses(accum)
    assert sorted(got) == [1, 2, 3] and all(np.isfinite(v[0]) for v in got.values())
