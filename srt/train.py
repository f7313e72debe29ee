"""Train SRT on shards: ``python -m srt.train --shards shards/msn`` (or under ``torchrun``).

``main`` reads top-down: flags, config, run time, model and streams, resume, loop. Each iteration of
``train_loop``: interval work (checkpoint / evaluate / visualise, with ``it`` steps done: the
reference's order), one optimizer step of ``grad_accum`` micro-batches, every ``print_every`` steps a
log record. Rank 0 writes the files; metrics are averaged over ranks. A non-finite loss stops the run
naming its iteration and the last checkpoint, and no checkpoint is written after it: on the GPU the
check waits for the next record or checkpoint (no host sync per step), on the CPU it is immediate.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from pipeline.durable import OutputError
from pipeline.fetch import ShardFetcher
from pipeline.reader import read_manifest
from pipeline.schema import RGB_PREFIX
from srt import config as run_config
from srt import distributed, runtime
from srt.checkpoint import (CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, load_model_state,
                            resume_training, save_checkpoint, training_checkpoint)
from srt.data import to_model_inputs
from srt.evaluate import evaluate
from srt.loader import EvalStream, StreamState, TrainStream, fixed_items, loader, split_shards
from srt.loss import LOSS_TERMS, FiniteGuard, NonFiniteLoss, srt_loss
from srt.metrics import get_lr, mse2psnr
from srt.model import count_parameters
from srt.model.init import make_model
from srt.runlog import RunLog
from srt.visualize import write_rotation_grids


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description='Train SRT on srt-shards WebDataset shards.',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--shards', required=True, help='shard directory of a converted dataset')
    p.add_argument('--config', help='reference-style YAML config (runs/<dataset>/<model>/config.yaml)')
    p.add_argument('--model', choices=('srt', 'isrt', 'vsrt', 'osrt'), default='srt',
                   help='reference config to start from when no --config is given')
    p.add_argument('--out', help='run directory (default: the directory of --config, else '
                   'runs/<dataset>_<model>)')
    p.add_argument('--shard-url', help="stream the shards from this URL template instead of "
                   "--shards, e.g. 'pipe:aws s3 cp s3://bucket/msn/{name} -' (--shards then only "
                   "needs the manifests)")
    p.add_argument('--init', help='start from the weights of this checkpoint (ours or the '
                   "reference's) when the run directory has none")
    run_config.add_override_flags(p)
    run_config.add_fetch_flags(p)
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


@dataclasses.dataclass
class TrainState:
    """A run's progress: what a checkpoint stores besides weights, optimizer and data position,
    and the loop's bookkeeping between two log records."""
    it: int = 0  # optimizer steps done
    epoch_it: int = 0
    elapsed: float = 0.0  # training seconds over all runs ('t' in the checkpoint)
    best: float | None = None  # best validation metric ('loss_val_best')
    run_id: str | None = None  # the wandb run's id
    data_state: dict | None = None  # the data streams' position in the resumed checkpoint
    start_it: int = 0  # the iteration this process started at
    last_checkpoint: str = 'none yet'  # model.pt written or resumed last, for error messages
    lr: float = 0.0
    loss_sums: dict[str, Tensor] | None = None  # loss terms summed on the device since the record
    steps: int = 0  # optimizer steps since the last record
    scenes: int = 0  # scenes since the last record
    t_log: float = 0.0  # time of the last record
    out_of_time: bool = False
    guard: FiniteGuard | None = None  # notes a non-finite loss without a host sync
    seen_keys: list[str] = dataclasses.field(default_factory=list)  # --debug-ddp


@dataclasses.dataclass
class Run:
    """What ``main`` builds once: settings, places, model, optimizer, streams."""
    args: argparse.Namespace
    cfg: run_config.RunConfig
    resolved: dict[str, Any]  # the config as resolved_config.yaml and every checkpoint store it
    rank: int
    world: int
    device: torch.device
    micro: int  # scenes per micro-batch per rank
    out_dir: str
    eval_split: str
    num_views: int
    model: nn.Module  # the unwrapped SRT (checkpoints, evaluation)
    optimizer: torch.optim.Optimizer
    render_kwargs: dict[str, Any]
    autocast: Callable
    compiled: bool  # torch.compile the steps' model
    step_model: nn.Module | None = None  # the model the steps run: compiled and/or DDP-wrapped
    stream_state: StreamState | None = None
    data_state: dict | None = None  # every rank's stream position, joined at the last interval work
    train_iter: Iterator | None = None
    batches_per_epoch: int = 1
    eval_stream: EvalStream | None = None
    vis: dict[str, dict] = dataclasses.field(default_factory=dict)
    bar: Any = None  # the loop's progress bar

    def __post_init__(self) -> None:
        self.master = self.rank == 0  # rank 0 writes the files
        self.log = RunLog(self.out_dir, enabled=self.master)

    def path(self, name: str) -> str:
        return os.path.join(self.out_dir, name)


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world, device = distributed.setup_distributed()
    try:
        manifest, eval_split = read_shards(args, rank == 0)
        flags = {name: getattr(args, name) for name in run_config.TRAINING_OVERRIDES}
        cfg = run_config.resolve(manifest['dataset'], args.config, args.model, flags,
                                 args.num_points, args.full_scale, args.shards)
        runtime.configure(device, cfg.training.seed, cfg.training.deterministic)
        run = build(args, cfg, manifest, eval_split, rank, world, device)
        state = resume(run)
        prepare_run_dir(run, state)
        open_streams(run, state)
        if args.wandb:
            state.run_id = run.log.start_wandb(state.run_id, run.resolved)
        train_loop(run, state)
        finish(run, state)
    except (NonFiniteLoss, CheckpointError, FileNotFoundError, ImportError, ValueError,
            OutputError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    finally:
        distributed.shutdown(barrier=False)
    return 0


def read_shards(args: argparse.Namespace, master: bool) -> tuple[dict[str, Any], str]:
    """(train manifest, evaluation split), checked before anything is built."""
    if not os.path.isdir(args.shards):
        raise FileNotFoundError(f'{args.shards}: no such shard directory (convert a dataset first: '
                                'tools/convert_*.py)')
    run_config.FetchConfig.from_args(args)  # the fetch flags, checked before anything is built
    manifest = read_manifest(args.shards, 'train')
    if manifest['num_scenes'] == 0:
        raise ValueError(f'{args.shards}: the train split has no scenes')
    eval_split = 'test' if args.test else 'val'
    if not os.path.exists(os.path.join(args.shards, f'{eval_split}.manifest.json')):
        if master:
            print(f'note: {args.shards} has no {eval_split} split; evaluating on test')
        eval_split = 'test'
    return manifest, eval_split


def build(args: argparse.Namespace, cfg: run_config.RunConfig, manifest: dict[str, Any],
          eval_split: str, rank: int, world: int, device: torch.device) -> Run:
    """The model (seeded, ``training.init``), its optimizer and the run's settings."""
    micro = cfg.training.micro_batch(world)  # ValueError unless the batch splits evenly
    name = run_config.model_name(cfg.model)
    out_dir = args.out or (os.path.dirname(os.path.abspath(args.config)) if args.config
                           else os.path.join('runs', f'{manifest["dataset"]}_{name}'))
    model = make_model(cfg.model, cfg.training.seed, cfg.training.init).to(device)
    try:
        optimizer = torch.optim.Adam(model.parameters(), lr=0.0, fused=True)
    except (RuntimeError, TypeError):
        optimizer = torch.optim.Adam(model.parameters(), lr=0.0)
    return Run(args=args, cfg=cfg, resolved=cfg.to_dict(), rank=rank, world=world, device=device,
               micro=micro, out_dir=out_dir, eval_split=eval_split, model=model, optimizer=optimizer,
               num_views=manifest.get('max_views') or  # schema 1: count the members
               sum(1 for m in manifest['members'] if m.startswith(f'{RGB_PREFIX}_')),
               render_kwargs=runtime.render_kwargs(cfg, args.shards, args.shard_url),
               autocast=runtime.autocast(device, cfg.training.precision),
               compiled=cfg.training.compile if cfg.training.compile is not None else
               device.type == 'cuda')


def resume(run: Run) -> TrainState:
    """The run directory's model.pt continues at its iteration, LR, data position and RNG state;
    else --init's weights (ours or the reference's) start a fresh run; else fresh weights."""
    ckpt_path, state, origin = run.path('model.pt'), TrainState(), None
    if os.path.exists(ckpt_path):
        p = resume_training(ckpt_path, run.model, run.optimizer, run.resolved, run.device)
        it, best = int(p['it']), p['loss_val_best']
        state = TrainState(it=it, epoch_it=int(p['epoch_it']), elapsed=float(p['t']), start_it=it,
                           best=float(best) if best is not None and np.isfinite(best) else None,
                           run_id=p['run_id'], data_state=p['data_state'],
                           last_checkpoint=f'{ckpt_path} (iteration {it})')
        origin = f'resumed from {ckpt_path} ({"srt-shards" if p["ours"] else "reference"}'
    elif run.args.init:
        ckpt = load_checkpoint(run.args.init, map_location=run.device)
        load_model_state(run.model, ckpt)
        ours = ckpt.get('format') == CHECKPOINT_FORMAT
        origin = f'initialised from {run.args.init} ({"srt-shards" if ours else "reference"}'
    if run.master and origin:
        print(f'{origin} checkpoint) at iteration {state.it}')
    return state


def prepare_run_dir(run: Run, state: TrainState) -> None:
    """Rank 0: the run directory and its log (``RunLog.start``), and the banner."""
    run.log.start(run.resolved, state.it)
    if not run.master:
        return
    tc, model = run.cfg.training, run.model
    enc, dec = count_parameters(model.encoder), count_parameters(model.decoder)
    print(f'{run.cfg.data.dataset} {run_config.model_name(run.cfg.model)}: encoder {enc:,} decoder '
          f'{dec:,} parameters; device {run.device} x {run.world}, '
          f'{"bf16" if runtime.use_bf16(tc.precision, run.device) else "fp32"}'
          f'{", compiled" if run.compiled else ""}; batch {tc.batch_size} ({run.micro} x '
          f'{tc.grad_accum} per rank); run dir {run.out_dir}')
    if run.args.print_model:
        print(model)
        for pname, param in model.named_parameters():
            print(f'{pname:80}{str(list(param.shape)):24}{param.numel():12,}')


def open_streams(run: Run, state: TrainState) -> None:
    """The training and evaluation streams, the visualisation batches, and the step model."""
    tc, args, cuda = run.cfg.training, run.args, run.device.type == 'cuda'
    # Remote shards are verified against the manifest's sha256 (docs/REMOTE.md); each DataLoader
    # worker gets the options and counts its own retries into the batches' events.
    fetcher = ShardFetcher(run_config.FetchConfig.from_args(args).options())
    train_shards = split_shards(args.shards, 'train', args.shard_url)
    # --full-scale is for evaluation only: training always samples num_points rays per scene.
    train_data = dataclasses.replace(run.cfg.data, full_scale=False)
    stream = TrainStream(train_data, train_shards, run.micro, seed=tc.seed, rank=run.rank,
                         world_size=run.world, shards_per_visit=tc.shards_per_visit,
                         item_buffer=tc.item_buffer, state=state.data_state, num_views=run.num_views,
                         fetcher=fetcher)
    run.stream_state = StreamState.of(stream, tc.num_workers, state.data_state)
    run.batches_per_epoch = max(1, stream.batches_per_epoch(run.num_views) // tc.grad_accum)
    run.train_iter = iter(loader(stream, tc.num_workers, pin_memory=cuda))
    eval_shards = split_shards(args.shards, run.eval_split, args.shard_url)
    eval_bs = tc.eval_batch_size or max(1, tc.batch_size // run.world // 8)
    run.eval_stream = EvalStream(run.cfg.data, eval_shards, eval_bs, rank=run.rank,
                                 world_size=run.world, max_scenes=tc.max_eval, seed=tc.seed,
                                 skip_bad=args.skip_bad, num_views=run.num_views, fetcher=fetcher)
    if run.master and (tc.visualize_every > 0 or args.visnow):
        run.vis = {'val': fixed_items(run.cfg.data, eval_shards, tc.vis_scenes, tc.seed, fetcher),
                   'train': fixed_items(run.cfg.data, train_shards, tc.vis_scenes, tc.seed, fetcher)}
    run.step_model = torch.compile(run.model) if run.compiled else run.model
    if run.world > 1:
        run.step_model = nn.parallel.DistributedDataParallel(
            run.step_model, device_ids=[run.device.index] if cuda else None)


def train_loop(run: Run, state: TrainState) -> None:
    """Iterate up to max_it (--exit-after: that many more; --max-minutes: until then)."""
    tc, args = run.cfg.training, run.args
    max_it = tc.max_it if args.exit_after is None else min(tc.max_it, state.it + args.exit_after)
    run.bar = tqdm(total=max_it, initial=state.it, desc='train', unit='it', disable=not run.master,
                   dynamic_ncols=True)
    state.guard = FiniteGuard(run.device)
    t_start = state.t_log = time.perf_counter()
    while True:
        interval_work(run, state)
        if state.it >= max_it or state.out_of_time:
            break
        train_step(run, state)
        run.bar.update(1)
        if args.max_minutes is not None and state.it % tc.print_every == 0:
            # rank 0 decides, so that all ranks stop at the same iteration
            state.out_of_time = distributed.broadcast_flag(
                time.perf_counter() - t_start > 60 * args.max_minutes, run.device)
        if state.it % tc.print_every == 0 or state.it == max_it or state.out_of_time:
            log_record(run, state)
    run.bar.close()


def interval_work(run: Run, state: TrainState) -> None:
    """Checkpoint, backup, visualise and evaluate on their intervals (--evalnow / --visnow: also
    before this process's first step). A resumed run does not redo its first iteration's work."""
    tc, args, it = run.cfg.training, run.args, state.it
    first = it == state.start_it
    save, backup = _due(state, tc.checkpoint_every), _due(state, tc.backup_every)
    validate = (args.evalnow and first) or _due(state, tc.validate_every)
    if save or backup or validate:
        state.guard.check(state.last_checkpoint)  # never keep or select the weights of a diverged step
        run.data_state = run.stream_state.global_state()  # a collective: every rank is here
    if save:
        write_checkpoint(run, state, run.path('model.pt'))
    if backup:
        write_checkpoint(run, state, run.path(f'model_{it}.pt'))
    if run.master and ((args.visnow and first) or _due(state, tc.visualize_every)):
        write_rotation_grids(run.out_dir, run.model, run.vis, run.device, run.render_kwargs,
                             run.autocast)
    if validate:
        run_validation(run, state)


def _due(state: TrainState, every: int) -> bool:
    """Interval work of ``every`` iterations is due (not at the iteration this process began at)."""
    return state.it > state.start_it and every > 0 and state.it % every == 0


def run_validation(run: Run, state: TrainState) -> None:
    """Evaluate on the evaluation split; rank 0 logs it and writes model_best.pt."""
    tc = run.cfg.training
    bar = tqdm(desc=f'eval {run.eval_split}', unit='item', leave=False, disable=not run.master)
    summary, _ = evaluate(run.model, loader(run.eval_stream, min(tc.num_workers, 2)), run.device,
                          run.render_kwargs, run.autocast, run.args.full_scale, progress=bar)
    bar.close()
    if run.master:
        run.log.write({'it': state.it, **{f'val_{k}': v for k, v in summary.items()}})
        run.bar.write(f'it {state.it}: {run.eval_split} ' + ', '.join(
            f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}' for k, v in summary.items()))
    # Every rank has the gathered summary and takes the same branch (write_checkpoint agrees).
    sign = 1.0 if tc.model_selection_mode == 'maximize' else -1.0
    if state.best is None or sign * (summary[tc.model_selection_metric] - state.best) > 0:
        state.best = summary[tc.model_selection_metric]
        write_checkpoint(run, state, run.path('model_best.pt'))


def write_checkpoint(run: Run, state: TrainState, path: str) -> None:
    """Rank 0 writes (atomically); every rank remembers model.pt as the last checkpoint. When the
    disk refuses it (``OutputError``) every rank stops, rather than train on unable to save."""
    failed: OutputError | None = None
    if run.master:
        progress = {'it': state.it, 'epoch_it': state.epoch_it, 't': state.elapsed,
                    'loss_val_best': state.best, 'run_id': state.run_id}
        try:
            save_checkpoint(path, training_checkpoint(run.model, run.optimizer, progress,
                                                      run.resolved, run.data_state))
        except OutputError as e:
            failed = e
    if distributed.broadcast_flag(failed is not None, run.device):
        raise failed or OutputError(0, f'rank 0 could not write it (see its error); '
                                    f'{state.last_checkpoint} resumes the run', path)
    if path == run.path('model.pt'):
        state.last_checkpoint = f'{path} (iteration {state.it})'


def train_step(run: Run, state: TrainState) -> None:
    """One optimizer step over ``grad_accum`` micro-batches (DDP syncs gradients on the last)."""
    tc = run.cfg.training
    state.lr = get_lr(state.it, tc.lr, tc.lr_warmup, tc.decay_it, tc.lr_decay)
    for group in run.optimizer.param_groups:
        group['lr'] = state.lr
    t0 = time.perf_counter()
    run.model.train()
    for m in range(tc.grad_accum):
        batch = next(run.train_iter)
        run.stream_state.update(batch)
        if run.args.debug_ddp:
            state.seen_keys += batch['scene_key']
        x = to_model_inputs(batch, run.device)
        last = run.world == 1 or m == tc.grad_accum - 1
        with contextlib.nullcontext() if last else run.step_model.no_sync():
            loss, terms = srt_loss(run.step_model, x, run.render_kwargs, run.autocast)
            (loss / tc.grad_accum).backward()
        terms = {k: v.detach() for k, v in terms.items()}
        state.loss_sums = terms if state.loss_sums is None else \
            {k: state.loss_sums[k] + v for k, v in terms.items()}
        state.guard.note(loss, state.it + 1)
        if run.device.type == 'cpu':  # a host sync is free here: stop before the optimizer step
            state.guard.check(state.last_checkpoint)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.it += 1
    state.steps += 1
    state.epoch_it = state.it // run.batches_per_epoch
    state.elapsed += time.perf_counter() - t0
    state.scenes += tc.batch_size


def log_record(run: Run, state: TrainState) -> None:
    """One metrics.jsonl record: the loss terms averaged over steps, micro-batches and ranks."""
    state.guard.check(state.last_checkpoint)
    steps, state.steps = state.steps, 0
    avg = torch.stack(list(state.loss_sums.values())) / (steps * run.cfg.training.grad_accum)
    avg = dict(zip(state.loss_sums, distributed.mean_over_ranks(avg).tolist()))
    state.loss_sums = None
    now = time.perf_counter()
    record = {'it': state.it, 'epoch': state.epoch_it,
              'loss': sum(v for k, v in avg.items() if k in LOSS_TERMS), **avg,
              'psnr': float(mse2psnr(torch.tensor(avg['mse']))), 'lr': state.lr,
              'scenes_per_s': state.scenes / (now - state.t_log),
              'step_time': (now - state.t_log) / steps, 'bad_data': run.stream_state.bad,
              'data_repeated': run.stream_state.repeated, 'data_skipped': run.stream_state.skipped,
              **run.stream_state.fetch_record(),
              **runtime.peak_memory(run.device)}
    state.t_log, state.scenes = now, 0
    if run.master:
        run.log.write(record)
        run.bar.set_postfix(loss=f'{record["loss"]:.4f}', psnr=f'{record["psnr"]:.2f}',
                            **({'fg_ari': f'{record["fg_ari"]:.3f}'} if 'fg_ari' in record else {}))


def finish(run: Run, state: TrainState) -> None:
    """The last checkpoint, the DDP debug record, and all ranks leave together."""
    if state.it > state.start_it:
        state.guard.check(state.last_checkpoint)
        run.data_state = run.stream_state.global_state()
        write_checkpoint(run, state, run.path('model.pt'))
    if run.args.debug_ddp:
        distributed.write_ddp_debug(run.model, state.seen_keys, run.out_dir, run.rank)
    distributed.shutdown(barrier=True)


if __name__ == '__main__':
    sys.exit(main())
