"""The trainer: exact resume after SIGKILL, DDP on CPU with gloo, reference checkpoints, bad input."""
import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
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
    # losses): it runs the same number of optimizer steps. That the update is the full batch's is
    # test_grad_accumulation_gives_the_full_batch_update.
    accum = tmp_path / 'accum'
    subprocess.run(train_cmd(nmr_shards, config, accum, '--grad-accum', 2), env=ENV, cwd=ROOT,
                   check=True, capture_output=True)
    got = losses(accum)
    assert sorted(got) == [1, 2, 3] and all(np.isfinite(v[0]) for v in got.values())


def test_a_non_finite_loss_stops_the_run_naming_the_iteration_and_the_last_checkpoint(
        nmr_shards, tmp_path):
    # lr 1e30 from the first step (no warm-up): Adam moves every weight by ~1e30, so the second
    # step's forward pass overflows.
    config = write_config(tmp_path / 'tiny.yaml', max_it=6, checkpoint_every=1, print_every=3)
    run = tmp_path / 'run'
    proc = subprocess.run(train_cmd(nmr_shards, config, run, '--lr', 1e30, '--lr-warmup', 0),
                          env=ENV, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert 'loss became non-finite (NaN or inf) at iteration 2;' in proc.stderr
    assert f'Last checkpoint: {run / "model.pt"} (iteration 1)' in proc.stderr
    assert 'Traceback' not in proc.stderr
    ckpt = torch.load(run / 'model.pt', weights_only=True)  # the step-1 weights, never later ones
    assert ckpt['it'] == 1 and not list(run.glob('model_best.pt'))
    assert all(torch.isfinite(v).all() for part in ('encoder', 'decoder') for v in ckpt[part].values())


def test_finite_guard_names_the_first_non_finite_iteration():
    from srt.loss import FiniteGuard, NonFiniteLoss
    guard = FiniteGuard('cpu')
    guard.note(torch.tensor(0.5), 1)
    guard.check('model.pt (iteration 0)')  # finite so far
    guard.note(torch.tensor(float('nan')), 2)
    guard.note(torch.tensor(float('inf')), 3)
    guard.note(torch.tensor(0.5), 4)
    with pytest.raises(NonFiniteLoss, match=r'at iteration 2;.*Last checkpoint: model.pt \(iter'):
        guard.check('model.pt (iteration 0)')


def _raw_batch(b, seed, h=16, w=16, p=24, k=1, t=2):
    """A collated batch as the training stream yields it (uint8 pixels, per-view ray matrices)."""
    rng = np.random.default_rng(seed)
    M = rng.normal(size=(b, k + t, 3, 3)).astype(np.float32)
    return {'input_images': rng.integers(0, 256, (b, k, h, w, 3), np.uint8),
            'input_M': M[:, :k], 'input_pos': rng.normal(size=(b, k, 3)).astype(np.float32),
            'target_pixels': rng.integers(0, 256, (b, p, 3), np.uint8),
            'target_uv': rng.integers(0, min(h, w), (b, p, 2)).astype(np.int16),
            'target_view': rng.integers(0, t, (b, p)).astype(np.int16),
            'target_M': M[:, k:], 'target_pos': rng.normal(size=(b, t, 3)).astype(np.float32),
            'input_grid': np.tile(np.array([0, 1], np.int16), (b, 1)),
            'target_hw': np.tile(np.array([h, w], np.int16), (b, 1)),
            'scene_key': [f's{i}' for i in range(b)], '_pos': np.array([0, 0, 1]),
            '_bad': np.array(0)}


def _one_train_step(batches, grad_accum, lr=0.5):
    """Parameters before and after srt.train's step over ``batches`` (one per micro-batch), from
    the same initial weights, with SGD: its update is the gradient itself (Adam's first update,
    lr * g / |g|, would hide a wrongly scaled gradient)."""
    import argparse
    import contextlib

    from srt import config as run_config
    from srt import train
    from srt.loader import StreamState
    from srt.loss import FiniteGuard
    from srt.model.init import make_model
    raw = json.loads(json.dumps(TINY_TRAIN))
    raw['training'].update(batch_size=2, grad_accum=grad_accum, lr=lr, lr_warmup=0)
    cfg = run_config.build(raw)
    model = make_model(cfg.model, 0, 'torch')
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    run = train.Run(args=argparse.Namespace(debug_ddp=False), cfg=cfg, resolved={}, rank=0, world=1,
                    device=torch.device('cpu'), micro=cfg.training.micro_batch(1), out_dir='unused',
                    eval_split='val', num_views=3, model=model,
                    optimizer=torch.optim.SGD(model.parameters(), lr=0.0), render_kwargs={},
                    autocast=contextlib.nullcontext, compiled=False, step_model=model,
                    stream_state=StreamState(0, 1, 1, 2 // grad_accum), train_iter=iter(batches))
    state = train.TrainState(guard=FiniteGuard('cpu'))
    train.train_step(run, state)
    assert state.it == 1 and next(run.train_iter, None) is None  # every micro-batch consumed
    mean_mse = float(state.loss_sums['mse']) / grad_accum  # what the log record averages
    return {k: v.detach() - before[k] for k, v in model.named_parameters()}, mean_mse


def test_grad_accumulation_gives_the_full_batch_update():
    full = _raw_batch(2, seed=1)
    halves = [{k: v[i:i + 1] if k not in ('_pos', '_bad') else v for k, v in full.items()}
              for i in range(2)]
    want, want_mse = _one_train_step([full], grad_accum=1)
    got, got_mse = _one_train_step(halves, grad_accum=2)
    assert any(float(u.abs().max()) > 1e-4 for u in want.values())  # the step moves the weights
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7, msg=name)
    assert abs(got_mse - want_mse) <= 1e-6 * want_mse
