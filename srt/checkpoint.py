"""Checkpoints: safe loading of ours and the reference's (stelzner/srt) into
:class:`srt.model.SRT`, atomic saving, RNG state, resume checks and loading a model for evaluation.

A reference checkpoint is a ``torch.save`` dict with ``encoder`` and ``decoder`` state dicts and
optionally ``optimizer``, ``it``, ``epoch_it``, ``t``, ``loss_val_best`` and ``run_id``. Ours adds
``format`` (``CHECKPOINT_FORMAT``), the resolved ``config``, ``data_state`` and ``rng``; the model
entries stay :func:`reference_state_dicts` of the unwrapped model, so the files stay
reference-compatible. Files are read with ``torch.load(..., weights_only=True)`` (no arbitrary code
runs; numpy scalars, which older training scripts may have stored, are allowed).
"""
from __future__ import annotations

import errno
import os
import random
from typing import Any, Dict, List, Mapping, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.durable import OutputError, atomic_output
from pipeline.reader import read_manifest
from srt import config as run_config
from srt.model import SRT

CHECKPOINT_FORMAT = 'srt-shards/1'
# Settings a resumed run must share with its checkpoint (others, e.g. intervals, may change).
RESUME_IDENTITY = {'data': ('dataset', 'num_points', 'kwargs'),
                   'model': ('encoder', 'encoder_kwargs', 'decoder', 'decoder_kwargs'),
                   'training': ('batch_size', 'lr', 'lr_warmup', 'decay_it', 'lr_decay', 'seed',
                                'grad_accum')}
PARTS = ('encoder', 'decoder')
WRAPPER_PREFIXES = ('_orig_mod.', 'module.')  # torch.compile, DistributedDataParallel / DataParallel
StateDict = Dict[str, Tensor]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not match the model."""


def _numpy_scalar_globals() -> List[Any]:
    allowed: List[Any] = [np.dtype]
    core = getattr(np, '_core', None) or getattr(np, 'core')
    allowed.append(core.multiarray.scalar)
    for name in ('Float64DType', 'Float32DType', 'Int64DType', 'Int32DType', 'BoolDType'):
        cls = getattr(getattr(np, 'dtypes', None), name, None)
        if cls is not None:
            allowed.append(cls)
    return allowed


def load_checkpoint(path: Union[str, os.PathLike], map_location: Any = 'cpu') -> Dict[str, Any]:
    """Read a checkpoint file safely (``weights_only=True``) and check it has model weights.

    Returns the dict as stored; a bare SRT state dict (``encoder.*`` / ``decoder.*`` keys, possibly
    behind wrapper prefixes) is split into ``encoder`` and ``decoder`` entries.
    """
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the path and the reason
        raise CheckpointError(f'cannot load checkpoint {os.fspath(path)!r} with weights_only=True: '
                              f'{exc}') from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'checkpoint {os.fspath(path)!r} holds a {type(ckpt).__name__}, '
                              'expected a dict')
    if not all(part in ckpt for part in PARTS):
        flat = strip_wrapper_prefixes(ckpt) if all(isinstance(v, Tensor) for v in ckpt.values()) else {}
        if flat and all(any(k.startswith(part + '.') for k in flat) for part in PARTS):
            return split_model_state_dict(flat)
        raise CheckpointError(f'checkpoint {os.fspath(path)!r} has no {list(PARTS)} entries '
                              f'(keys: {sorted(ckpt)[:10]})')
    return ckpt


def strip_wrapper_prefixes(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Remove leading ``_orig_mod.`` / ``module.`` (in any nesting) from every key."""
    out = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


def split_model_state_dict(state_dict: Mapping[str, Tensor]) -> Dict[str, StateDict]:
    """A whole-model state dict (``encoder.*``, ``decoder.*``) -> {'encoder': ..., 'decoder': ...}."""
    state_dict = strip_wrapper_prefixes(state_dict)
    parts: Dict[str, StateDict] = {part: {} for part in PARTS}
    for key, value in state_dict.items():
        part, _, rest = key.partition('.')
        if part not in parts:
            raise CheckpointError(f'state dict key {key!r} belongs to neither encoder nor decoder')
        parts[part][rest] = value
    return parts


def unwrap(model: nn.Module) -> nn.Module:
    """The module under ``torch.compile`` (``_orig_mod``) and DDP (``module``) wrappers."""
    while True:
        if hasattr(model, '_orig_mod'):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def _mismatch_report(module: nn.Module, state_dict: Mapping[str, Tensor], limit: int = 20) -> str:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = sorted(f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}'
                    for k in set(expected) & set(state_dict) if state_dict[k].shape != expected[k].shape)
    lines = []
    for title, items in (('missing keys', missing), ('unexpected keys', unexpected),
                         ('shape mismatches', shapes)):
        if items:
            more = f' ... and {len(items) - limit} more' if len(items) > limit else ''
            lines.append(f'  {title} ({len(items)}): {", ".join(items[:limit])}{more}')
    return '\n'.join(lines)


def load_model_state(model: nn.Module, checkpoint: Mapping[str, Any]) -> None:
    """Load a checkpoint's ``encoder`` and ``decoder`` into ``model`` strictly.

    ``model`` may be wrapped (torch.compile, DDP) and the state dicts may carry wrapper prefixes.
    Raises :class:`CheckpointError` listing missing / unexpected keys and shape mismatches.
    """
    model = unwrap(model)
    problems = []
    for part in PARTS:
        if part not in checkpoint:
            raise CheckpointError(f'checkpoint has no {part!r} entry (keys: {sorted(checkpoint)[:10]})')
        state_dict = strip_wrapper_prefixes(checkpoint[part])
        report = _mismatch_report(getattr(model, part), state_dict)
        if report:
            problems.append(f'{part}:\n{report}')
    if problems:
        config = getattr(model, 'config', None)
        what = f' (encoder={config.encoder!r}, decoder={config.decoder!r})' if config is not None else ''
        raise CheckpointError(f'checkpoint does not match the model{what}:\n' + '\n'.join(problems))
    for part in PARTS:
        getattr(model, part).load_state_dict(strip_wrapper_prefixes(checkpoint[part]), strict=True)


def load_reference_checkpoint(model: nn.Module, path: Union[str, os.PathLike],
                              map_location: Any = 'cpu') -> Dict[str, Any]:
    """Load weights from ``path`` into ``model``; return the other entries (optimizer, it, ...)."""
    ckpt = load_checkpoint(path, map_location=map_location)
    load_model_state(model, ckpt)
    return {k: v for k, v in ckpt.items() if k not in PARTS}


def reference_state_dicts(model: nn.Module) -> Dict[str, StateDict]:
    """{'encoder': ..., 'decoder': ...} of the unwrapped model: the reference checkpoint's entries."""
    model = unwrap(model)
    return {part: getattr(model, part).state_dict() for part in PARTS}


# ----------------------------------------------------------------------------- saving and resuming

_last_size: Dict[str, int] = {}  # bytes of the last checkpoint this process wrote, per directory


def save_checkpoint(path: Union[str, os.PathLike], payload: Mapping[str, Any]) -> None:
    """Write atomically: a temporary file, fsync, rename (a kill never leaves half a checkpoint).
    A full disk, a read-only file system, a quota or permissions raise ``OutputError`` naming the
    path, before writing when the free space is under twice the previous checkpoint's size; the
    previous file at ``path`` is then untouched and no temporary file is left."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    size = os.path.getsize(path) if os.path.exists(path) else _last_size.get(directory, 0)
    st = os.statvfs(directory)
    if st.f_bavail * st.f_frsize < 2 * size:
        raise OutputError(errno.ENOSPC, f'cannot write checkpoint: {st.f_bavail * st.f_frsize:,} '
                          f'bytes free, about {2 * size:,} needed (free space or use another '
                          '--out; the previous checkpoint resumes the run)', path)
    with atomic_output(path, 'checkpoint') as f:
        torch.save(dict(payload), f)
    _last_size[directory] = os.path.getsize(path)


def rng_state() -> Dict[str, Any]:
    """The torch, numpy, Python (and CUDA) generators' states, storable with weights_only."""
    np_state = np.random.get_state()
    state = {'torch': torch.get_rng_state(), 'numpy': np_state[1].tolist(), 'numpy_pos': np_state[2],
             'python': list(random.getstate()[1])}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state['torch'])
    np.random.set_state(('MT19937', np.array(state['numpy'], np.uint32), state['numpy_pos'], 0, 0.0))
    random.setstate((3, tuple(state['python']), None))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


# Progress entries of a checkpoint (the reference's names), besides weights and optimizer.
PROGRESS_DEFAULTS = {'it': 0, 'epoch_it': 0, 't': 0.0, 'loss_val_best': None, 'run_id': None}


def training_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer,
                        progress: Mapping[str, Any], config: Mapping[str, Any],
                        data_state: Mapping[str, Any]) -> Dict[str, Any]:
    """Our checkpoint: the reference's entries (weights of the unwrapped model, optimizer,
    ``PROGRESS_DEFAULTS``' keys from ``progress``) plus format, resolved config, data-stream
    position and RNG state."""
    return {**reference_state_dicts(model), 'optimizer': optimizer.state_dict(),
            **{k: progress[k] for k in PROGRESS_DEFAULTS}, 'format': CHECKPOINT_FORMAT,
            'config': config, 'data_state': data_state, 'rng': rng_state()}


def resume_training(path: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                    config: Mapping[str, Any], map_location: Any = 'cpu') -> Dict[str, Any]:
    """Continue from ``path`` (ours or a reference checkpoint): load the weights and optimizer; for
    ours, first check that ``config`` (resolved) agrees (:func:`check_resume`), and restore the RNG
    state. Returns the progress entries (defaults where absent), ``data_state`` (None unless ours)
    and ``ours``."""
    ckpt = load_checkpoint(path, map_location=map_location)
    load_model_state(model, ckpt)
    ours = ckpt.get('format') == CHECKPOINT_FORMAT
    if ours:
        check_resume(ckpt['config'], config, path)
    if 'optimizer' in ckpt:
        optimizer.load_state_dict(ckpt['optimizer'])
    if ours:
        set_rng_state(ckpt['rng'])
    progress = {k: ckpt.get(k, v) for k, v in PROGRESS_DEFAULTS.items()}
    return {**progress, 'data_state': ckpt.get('data_state') if ours else None, 'ours': ours}


def check_resume(ckpt_config: Mapping[str, Any], config: Mapping[str, Any], path: str) -> None:
    """Raise CheckpointError naming every ``RESUME_IDENTITY`` setting in which the run's resolved
    ``config`` differs from the checkpoint's."""
    diffs = []
    for section, keys in RESUME_IDENTITY.items():
        for k in keys:
            a, b = ckpt_config.get(section, {}).get(k), config[section].get(k)
            if a != b:
                diffs.append(f'{section}.{k}: checkpoint {a!r}, now {b!r}')
    if diffs:
        raise CheckpointError(f'{path} was trained with another config: ' + '; '.join(diffs) +
                              ' (use another --out, or the checkpoint\'s settings)')


def reference_config_of(ckpt: Mapping[str, Any], dataset: str) -> Dict[str, Any]:
    """The reference config of ``dataset`` for the model a reference checkpoint holds, read off its
    weights: OSRT (slot attention in the encoder; the decoder type, slot count, allocation layers and
    mixing-block norms from the keys and shapes), the volumetric decoder (vsrt), the improved SRT
    (isrt) or SRT. ValueError when the reference has no config for that model and dataset."""
    encoder = strip_wrapper_prefixes(ckpt['encoder'])
    decoder = strip_wrapper_prefixes(ckpt['decoder'])
    if 'slot_attention.initial_slots' in encoder:
        raw = run_config.reference_config(dataset, 'osrt')
        model = raw['model']
        model['encoder_kwargs'] = {**model['encoder_kwargs'],
                                   'num_slots': int(encoder['slot_attention.initial_slots'].shape[0])}
        if not any(k.startswith('mixing_block.') for k in decoder):
            model['decoder'] = 'spatial_broadcast'
            return raw
        layers = {k.split('.')[3] for k in decoder if k.startswith('allocation_transformer.'
                                                                   'transformer.layers.')}
        model['decoder_kwargs'] = {**model['decoder_kwargs'], 'num_att_blocks': len(layers),
                                   'layer_norm': 'mixing_block.norm1.weight' in decoder}
        return raw
    isrt = any(k.startswith('allocation_transformer') for k in decoder)
    nerf = any(k.startswith('coarse_net') for k in decoder)
    return run_config.reference_config(dataset, 'vsrt' if nerf else 'isrt' if isrt else 'srt')


def load_for_evaluation(checkpoint: str, shards: str, config: str | None = None,
                        device: Any = 'cpu') -> Tuple[SRT, run_config.RunConfig, Dict[str, Any]]:
    """(model, RunConfig, checkpoint dict) from our checkpoint (its config inside) or a reference
    checkpoint (config from ``config``, else the reference config of the shards' dataset, with the
    encoder/decoder type read off the weights). Raises CheckpointError when the config is for
    another dataset than the shards hold."""
    ckpt = load_checkpoint(checkpoint, map_location=device)
    dataset = read_manifest(shards, 'train' if os.path.exists(
        os.path.join(shards, 'train.manifest.json')) else 'test')['dataset']
    if config is not None:
        raw = run_config.load_yaml(config)
    elif 'config' in ckpt:
        raw = ckpt['config']
    else:
        raw = reference_config_of(ckpt, dataset)
    if run_config.config_dataset(raw) != dataset:
        raise CheckpointError(f'the checkpoint\'s config is for {raw["data"]["dataset"]!r}, the '
                              f'shards in {shards} hold {dataset!r}')
    cfg = run_config.build(raw)
    model = SRT(cfg.model).to(device)
    load_model_state(model, ckpt)
    return model, cfg, ckpt
