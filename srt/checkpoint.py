"""Loading reference-format checkpoints (stelzner/srt) into :class:`srt.model.SRT`.

A reference checkpoint is a ``torch.save`` dict with ``encoder`` and ``decoder`` state dicts and
optionally ``optimizer``, ``it``, ``epoch_it``, ``t``, ``loss_val_best`` and ``run_id``. Files are read
with ``torch.load(..., weights_only=True)`` (no arbitrary code runs; numpy scalars, which older
training scripts may have stored, are allowed). Saving is the trainer's business; it should store
:func:`reference_state_dicts` of the unwrapped model so that the files stay reference-compatible.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Union

import numpy as np
import torch
from torch import Tensor, nn

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
