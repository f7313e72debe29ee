"""Train SRT on shards: ``python -m srt.train --shards shards/msn`` (or under ``torchrun``).

One loop, top to bottom: resolve the config, build model and streams, resume if the run directory
has a checkpoint, then per iteration: checkpoint / evaluate / visualise on their intervals, set the
learning rate, run ``grad_accum`` micro-batches forward and backward, step the optimizer, log.
Only rank 0 writes files; metrics are averaged over ranks.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
import uuid

import numpy as np
import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from pipeline.reader import ShardError, read_manifest
from srt import config as run_config
from srt.checkpoint import CheckpointError, load_checkpoint, load_model_state, reference_state_dicts
from srt.data import to_model_inputs
from srt.evaluate import evaluate
from srt.loader import EvalStream, StreamState, TrainStream, fixed_items, loader, shard_table
from srt.metrics import get_lr, mse2psnr
from srt.model.init import make_model
from srt.model import count_parameters
from srt.visualize import render_rotations, save_grid

CHECKPOINT_FORMAT = 'srt-shards/1'
# Settings a resumed run must share with its checkpoint (others, e.g. intervals, may change).
_IDENTITY = {'data': ('dataset', 'num_points', 'kwargs'),
             'model': ('encoder', 'encoder_kwargs', 'decoder', 'decoder_kwargs'),
             'training': ('batch_size', 'lr', 'lr_warmup', 'decay_it', 'lr_decay', 'seed',
                          'grad_accum')}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description='Train SRT on srt-shards WebDataset shards.',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--shards', required=True, help='shard directory of a converted dataset')
    p.add_argument('--config', help='reference-style YAML config (runs/<dataset>/<model>/config.yaml)')
    p.add_argument('--model', choices=('srt', 'isrt', 'vsrt'), default='srt',
                   help='reference config to start from when no --config is given')
    p.add_argument('--out', help='run directory (default: the directory of --config, else '
                   'runs/<dataset>_<model>)')
    p.add_argument('--shard-url', help="stream the shards from this URL template instead of "
                   "--shards, e.g. 'pipe:aws s3 cp s3://bucket/msn/{name} -' (--shards then only "
                   "needs the manifests)")
    p.add_argument('--init', help='start from the weights of this checkpoint (ours or the '
                   "reference's) when the run directory has none")
    g = p.add_argument_group('overrides of the config')
    g.add_argument('--batch-size', type=int, help='global batch (scenes per optimizer step)')
    g.add_argument('--num-points', type=int, help='target rays per scene')
    g.add_argument('--max-it', type=int)
    g.add_argument('--lr', type=float, help='peak learning rate')
    g.add_argument('--lr-warmup', type=int)
    g.add_argument('--decay-it', type=int)
    g.add_argument('--precision', choices=('auto', 'bf16', 'fp32'))
    g.add_argument('--compile', action=argparse.BooleanOptionalAction, default=None,
                   help='torch.compile the model (default: on for CUDA, off on CPU)')
    g.add_argument('--workers', type=int, help='data-loading processes per rank')
    g.add_argument('--seed', type=int)
    g.add_argument('--print-every', type=int)
    g.add_argument('--eval-every', type=int, dest='validate_every')
    g.add_argument('--vis-every', type=int, dest='visualize_every')
    g.add_argument('--checkpoint-every', type=int)
    g.add_argument('--backup-every', type=int)
    g.add_argument('--grad-accum', type=int, help='micro-batches per optimizer step')
    g.add_argument('--activation-checkpointing', action=argparse.BooleanOptionalAction, default=None,
                   dest='checkpointing', help='recompute transformer activations in backward')
    g.add_argument('--max-eval', type=int, help='evaluate on the first N scenes only')
    g.add_argument('--deterministic', action='store_true', default=None,
                   help='deterministic torch algorithms (for exact-resume checks)')
    p.add_argument('--exit-after', type=int, help='exit after this many iterations of this run')
    p.add_argument('--max-minutes', type=float, help='stop (with a checkpoint) after this much '
                   'training time in this run')
    p.add_argument('--evalnow', action='store_true', help='evaluate before the first step')
    p.add_argument('--visnow', action='store_true', help='visualise before the first step')
    p.add_argument('--test', action='store_true', help='evaluate on the test split instead of val')
    p.add_argument('--full-scale', action='store_true', help='evaluate on full images (PSNR + SSIM)')
    p.add_argument('--skip-bad', action='store_true', help='evaluation skips unreadable shards')
    p.add_argument('--wandb', action='store_true', help='log to Weights & Biases')
    p.add_argument('--print-model', action='store_true', help='print the model and its parameters')
    p.add_argument('--debug-ddp', action='store_true',
                   help='write ddp_debug.json: per-rank parameter checksums and scenes seen')
    return p.parse_args(argv)


def setup_distributed():
    """(rank, world_size, device). torchrun sets the environment; NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get('WORLD_SIZE', 1))
    cuda = torch.cuda.is_available()
    if world > 1:
        local = int(os.environ['LOCAL_RANK'])
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group('nccl' if cuda else 'gloo')
        rank = dist.get_rank()
        device = torch.device(f'cuda:{local}' if cuda else 'cpu')
    else:
        rank, device = 0, torch.device('cuda' if cuda else 'cpu')
    return rank, world, device


def fail(message: str) -> None:
    print(f'error: {message}', file=sys.stderr)
    raise SystemExit(2)


def resolve_config(args, dataset: str) -> tuple[run_config.RunConfig, dict]:
    raw = run_config.load_yaml(args.config) if args.config else \
        run_config.reference_config(dataset, args.model)
    if raw['data']['dataset'] != dataset:
        fail(f'the config is for dataset {raw["data"]["dataset"]!r} but {args.shards} holds '
             f'{dataset!r} shards')
    training = raw.setdefault('training', {})
    for name in ('batch_size', 'max_it', 'lr', 'lr_warmup', 'decay_it', 'precision', 'compile',
                 'seed', 'print_every', 'validate_every', 'visualize_every', 'checkpoint_every',
                 'backup_every', 'grad_accum', 'checkpointing', 'max_eval', 'deterministic'):
        if getattr(args, name, None) is not None:
            training[name] = getattr(args, name)
    if args.workers is not None:
        training['num_workers'] = args.workers
    if args.num_points is not None:
        raw['data']['num_points'] = args.num_points
    try:
        return run_config.build(raw, full_scale=args.full_scale), raw
    except ValueError as e:
        fail(str(e))


def check_resume(ckpt_cfg: dict, cfg: dict, path: str) -> None:
    diffs = []
    for section, keys in _IDENTITY.items():
        for k in keys:
            a, b = ckpt_cfg.get(section, {}).get(k), cfg[section].get(k)
            if a != b:
                diffs.append(f'{section}.{k}: checkpoint {a!r}, now {b!r}')
    if diffs:
        fail(f'{path} was trained with another config: ' + '; '.join(diffs) +
             ' (use another --out, or the checkpoint\'s settings)')


def save_checkpoint(path: str, payload: dict) -> None:
    """Write atomically: a temporary file, fsync, rename (a kill never leaves half a checkpoint)."""
    tmp = f'{path}.tmp-{os.getpid()}'
    with open(tmp, 'wb') as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {'torch': torch.get_rng_state(), 'numpy': np_state[1].tolist(), 'numpy_pos': np_state[2],
             'python': list(random.getstate()[1])}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state['torch'])
    np.random.set_state(('MT19937', np.array(state['numpy'], np.uint32), state['numpy_pos'], 0, 0.0))
    random.setstate((3, tuple(state['python']), None))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    master = rank == 0

    # ---------------------------------------------------------------- data and config, checked
    if not os.path.isdir(args.shards):
        fail(f'{args.shards}: no such shard directory (convert a dataset first: tools/convert_*.py)')
    try:
        manifest = read_manifest(args.shards, 'train')
    except (FileNotFoundError, ShardError) as e:
        fail(str(e))
    if manifest['num_scenes'] == 0:
        fail(f'{args.shards}: the train split has no scenes')
    dataset = manifest['dataset']
    eval_split = 'test' if args.test else 'val'
    if not os.path.exists(os.path.join(args.shards, f'{eval_split}.manifest.json')):
        if master:
            print(f'note: {args.shards} has no {eval_split} split; evaluating on test')
        eval_split = 'test'
    cfg, raw = resolve_config(args, dataset)
    tc = cfg.training
    if tc.batch_size % world:
        fail(f'batch size {tc.batch_size} is not divisible by the world size {world}')
    per_rank = tc.batch_size // world
    if per_rank % tc.grad_accum:
        fail(f'the per-rank batch {per_rank} is not divisible by --grad-accum {tc.grad_accum}')
    micro = per_rank // tc.grad_accum
    name = run_config.model_name(cfg.model)
    out_dir = args.out or (os.path.dirname(os.path.abspath(args.config)) if args.config
                           else os.path.join('runs', f'{dataset}_{name}'))
    resolved = cfg.to_dict()
    num_views = sum(1 for m in manifest['members'] if m.startswith('rgb_'))

    seed = tc.seed
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    if tc.deterministic:
        torch.use_deterministic_algorithms(True)
    cuda = device.type == 'cuda'
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    bf16 = tc.precision == 'bf16' or (tc.precision == 'auto' and (
        torch.cuda.is_bf16_supported() if cuda else False))
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 \
        else contextlib.nullcontext
    compile_model = tc.compile if tc.compile is not None else cuda

    # ---------------------------------------------------------------- model, optimizer, resume
    model = make_model(cfg.model, seed, tc.init).to(device)
    if cfg.model.decoder == 'nerf':
        render_kwargs = {'min_dist': manifest_near_far(args.shards)[0],
                         'max_dist': manifest_near_far(args.shards)[1],
                         'num_coarse_samples': tc.num_coarse_samples,
                         'num_fine_samples': tc.num_fine_samples}
    else:
        render_kwargs = {}
    try:
        optimizer = torch.optim.Adam(model.parameters(), lr=0.0, fused=True)
    except (RuntimeError, TypeError):
        optimizer = torch.optim.Adam(model.parameters(), lr=0.0)
    it, epoch_it, elapsed, best, run_id, data_state = 0, 0, 0.0, None, None, None
    ckpt_path = os.path.join(out_dir, 'model.pt')
    start_from = ckpt_path if os.path.exists(ckpt_path) else args.init
    if start_from:
        try:
            ckpt = load_checkpoint(start_from, map_location=device)
            load_model_state(model, ckpt)
        except CheckpointError as e:
            fail(str(e))
        ours = ckpt.get('format') == CHECKPOINT_FORMAT
        if start_from == ckpt_path:  # resume: same iteration, LR, data position and RNG
            if ours:
                check_resume(ckpt['config'], resolved, start_from)
            if 'optimizer' in ckpt:
                optimizer.load_state_dict(ckpt['optimizer'])
            it, epoch_it = int(ckpt.get('it', 0)), int(ckpt.get('epoch_it', 0))
            elapsed, best = float(ckpt.get('t', 0.0)), ckpt.get('loss_val_best')
            run_id = ckpt.get('run_id')
            if ours:
                data_state = ckpt.get('data_state')
                set_rng_state(ckpt['rng'])
        if master:
            print(f'{"resumed" if start_from == ckpt_path else "initialised"} from {start_from} '
                  f'({"srt-shards" if ours else "reference"} checkpoint) at iteration {it}')
    best = float(best) if best is not None and np.isfinite(best) else None
    sign = 1.0 if tc.model_selection_mode == 'maximize' else -1.0

    if master:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, 'resolved_config.yaml'), 'w') as f:
            yaml.safe_dump(resolved, f, sort_keys=False)
        metrics_path = os.path.join(out_dir, 'metrics.jsonl')
        _truncate_metrics(metrics_path, it)
        enc, dec = count_parameters(model.encoder), count_parameters(model.decoder)
        print(f'{dataset} {name}: encoder {enc:,} decoder {dec:,} parameters; device {device} x '
              f'{world}, {"bf16" if bf16 else "fp32"}{", compiled" if compile_model else ""}; '
              f'batch {tc.batch_size} ({micro} x {tc.grad_accum} per rank); run dir {out_dir}')
        if args.print_model:
            print(model)
            for pname, param in model.named_parameters():
                print(f'{pname:80}{str(list(param.shape)):24}{param.numel():12,}')

    # ---------------------------------------------------------------- streams
    train_shards = shard_table(args.shards, 'train', args.shard_url)
    stream_state = StreamState(seed, world, tc.num_workers, micro, data_state)
    # --full-scale is for evaluation only: training always samples num_points rays per scene.
    train_data = dataclasses.replace(cfg.data, full_scale=False)
    train_stream = TrainStream(train_data, train_shards, micro, seed=seed, rank=rank,
                               world_size=world, shards_per_visit=tc.shards_per_visit,
                               item_buffer=tc.item_buffer, state=data_state)
    batches_per_epoch = max(1, train_stream.batches_per_epoch(num_views) // tc.grad_accum)
    train_iter = iter(loader(train_stream, tc.num_workers, pin_memory=cuda))
    eval_shards = shard_table(args.shards, eval_split, args.shard_url)
    eval_bs = tc.eval_batch_size or max(1, per_rank // 8)
    eval_stream = EvalStream(cfg.data, eval_shards, eval_bs, rank=rank, world_size=world,
                             max_scenes=tc.max_eval, seed=seed, skip_bad=args.skip_bad)
    vis = {}
    if master and (tc.visualize_every > 0 or args.visnow):
        vis = {'val': fixed_items(cfg.data, eval_shards, tc.vis_scenes, seed),
               'train': fixed_items(cfg.data, train_shards, tc.vis_scenes, seed)}

    step_model = model
    if compile_model:
        step_model = torch.compile(step_model)
    if world > 1:
        step_model = torch.nn.parallel.DistributedDataParallel(
            step_model, device_ids=[device.index] if cuda else None)

    wandb = None
    if args.wandb and master:
        try:
            import wandb
        except ImportError:
            fail('--wandb needs the wandb package (pip install wandb)')
        run_id = run_id or uuid.uuid4().hex[:8]
        wandb.init(project='srt-shards', name=out_dir, id=run_id, resume='allow', config=resolved)

    def checkpoint_payload() -> dict:
        return {**reference_state_dicts(model), 'optimizer': optimizer.state_dict(), 'it': it,
                'epoch_it': epoch_it, 't': elapsed, 'loss_val_best': best, 'run_id': run_id,
                'format': CHECKPOINT_FORMAT, 'config': resolved,
                'data_state': stream_state.state_dict(), 'rng': rng_state()}

    def run_evaluation() -> dict:
        bar = tqdm(total=None, desc=f'eval {eval_split}', unit='item', leave=False,
                   disable=not master)
        summary, _ = evaluate(model, loader(eval_stream, min(tc.num_workers, 2)), device,
                              render_kwargs, autocast, args.full_scale, progress=bar)
        bar.close()
        return summary

    # ---------------------------------------------------------------- the loop
    max_it = tc.max_it if args.exit_after is None else min(tc.max_it, it + args.exit_after)
    start_it = it
    bar = tqdm(total=max_it, initial=it, desc='train', unit='it', disable=not master,
               dynamic_ncols=True)
    seen_keys: list[str] = []
    t_start, out_of_time = time.perf_counter(), False
    t_log, scenes_since_log, loss_acc, acc_steps = time.perf_counter(), 0, None, 0
    while True:
        # Interval work happens at the top of an iteration, with `it` steps done (the reference's
        # order); a resumed run does not redo it for the iteration it resumed at.
        fresh = it > start_it
        if master and fresh and tc.checkpoint_every > 0 and it % tc.checkpoint_every == 0:
            save_checkpoint(ckpt_path, checkpoint_payload())
        if master and fresh and tc.backup_every > 0 and it % tc.backup_every == 0:
            save_checkpoint(os.path.join(out_dir, f'model_{it}.pt'), checkpoint_payload())
        if master and (args.visnow or (fresh and tc.visualize_every > 0
                                       and it % tc.visualize_every == 0)):
            for split_name, batch in vis.items():
                inputs, renders, depths = render_rotations(model, batch, device, render_kwargs,
                                                           autocast=autocast)
                save_grid(os.path.join(out_dir, f'renders-{split_name}.png'), inputs, renders,
                          depths, far=render_kwargs.get('max_dist'))
        if args.evalnow or (fresh and tc.validate_every > 0 and it % tc.validate_every == 0):
            summary = run_evaluation()
            metric = summary[tc.model_selection_metric]
            if master:
                log(metrics_path, {'it': it, **{f'val_{k}': v for k, v in summary.items()}}, wandb)
                bar.write(f'it {it}: {eval_split} ' + ', '.join(
                    f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}' for k, v in summary.items()))
                if best is None or sign * (metric - best) > 0:
                    best = metric
                    save_checkpoint(os.path.join(out_dir, 'model_best.pt'), checkpoint_payload())
        args.evalnow = args.visnow = False
        if it >= max_it or out_of_time:
            break

        lr = get_lr(it, tc.lr, tc.lr_warmup, tc.decay_it, tc.lr_decay)
        for group in optimizer.param_groups:
            group['lr'] = lr
        t0 = time.perf_counter()
        model.train()
        for m in range(tc.grad_accum):
            batch = next(train_iter)
            stream_state.update(batch)
            if args.debug_ddp:
                seen_keys += batch['scene_key']
            x = to_model_inputs(batch, device)
            sync = contextlib.nullcontext() if (world == 1 or m == tc.grad_accum - 1) \
                else step_model.no_sync()
            with sync:
                with autocast():
                    pred, extras = step_model(x['input_images'], x['input_camera_pos'],
                                              x['input_rays'], x['target_camera_pos'],
                                              x['target_rays'], **render_kwargs)
                target = x['target_pixels']
                mse = ((pred.float() - target) ** 2).mean(dim=(1, 2))  # per scene
                terms = {'mse': mse.mean()}
                loss = terms['mse']
                if 'coarse_img' in extras:
                    terms['coarse_mse'] = ((extras['coarse_img'].float() - target) ** 2).mean()
                    loss = loss + terms['coarse_mse']
                (loss / tc.grad_accum).backward()
            terms = {k: v.detach() for k, v in terms.items()}
            loss_acc = terms if loss_acc is None else {k: loss_acc[k] + v for k, v in terms.items()}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        it += 1
        acc_steps += 1
        epoch_it = it // batches_per_epoch
        elapsed += time.perf_counter() - t0
        scenes_since_log += tc.batch_size
        bar.update(1)

        if args.max_minutes is not None and it % tc.print_every == 0:
            # rank 0 decides, so that all ranks stop at the same iteration
            flag = torch.tensor(float(time.perf_counter() - t_start > 60 * args.max_minutes),
                                device=device if cuda else 'cpu')
            if world > 1:
                dist.broadcast(flag, 0)
            out_of_time = bool(flag)
        if it % tc.print_every == 0 or it == max_it or out_of_time:
            steps, acc_steps = acc_steps, 0
            avg = torch.stack([v for v in loss_acc.values()]) / (steps * tc.grad_accum)
            if world > 1:
                dist.all_reduce(avg, op=dist.ReduceOp.AVG)
            avg = dict(zip(loss_acc, avg.tolist()))  # the only host sync of the loop
            loss_acc = None
            now = time.perf_counter()
            record = {'it': it, 'epoch': epoch_it, 'loss': sum(avg.values()), **avg,
                      'psnr': float(mse2psnr(torch.tensor(avg['mse']))), 'lr': lr,
                      'scenes_per_s': scenes_since_log / (now - t_log),
                      'step_time': (now - t_log) / steps, 'bad_data': stream_state.bad}
            if cuda:
                record['peak_mem_gb'] = torch.cuda.max_memory_allocated(device) / 2**30
            else:
                import resource
                record['peak_rss_gb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            t_log, scenes_since_log = now, 0
            if master:
                log(metrics_path, record, wandb)
                bar.set_postfix(loss=f'{record["loss"]:.4f}', psnr=f'{record["psnr"]:.2f}')

    bar.close()
    if master and it > start_it:
        save_checkpoint(ckpt_path, checkpoint_payload())
    if args.debug_ddp:
        write_ddp_debug(model, seen_keys, out_dir, rank, world)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def manifest_near_far(directory: str) -> tuple[float, float]:
    from pipeline.schema import DATASETS
    d = DATASETS[read_manifest(directory, 'train')['dataset']]
    return d['near'], d['far']


def log(path: str, record: dict, wandb=None) -> None:
    with open(path, 'a') as f:
        f.write(json.dumps(record) + '\n')
    if wandb is not None:
        wandb.log(record, step=record['it'])


def _truncate_metrics(path: str, it: int) -> None:
    """On resume, drop records of iterations after the checkpoint (they will be redone)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)['it'] <= it]
    with open(path, 'w') as f:
        f.writelines(keep)


def write_ddp_debug(model, seen_keys, out_dir, rank, world) -> None:
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    info = {'rank': rank, 'param_sum': float(flat.sum()), 'param_abs_sum': float(flat.abs().sum()),
            'scenes': sorted(set(seen_keys))}
    gathered = [None] * world
    if world > 1:
        dist.all_gather_object(gathered, info)
    else:
        gathered = [info]
    if rank == 0:
        with open(os.path.join(out_dir, 'ddp_debug.json'), 'w') as f:
            json.dump(gathered, f)


if __name__ == '__main__':
    sys.exit(main())
