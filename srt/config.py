"""Run configuration: the reference YAML's three sections as dataclasses, plus our options.

A run config is resolved in this order: the reference config of the shards' dataset (``runs/``, the
same as ``REFERENCE_CONFIGS`` below; for datasets outside SRT's, ours ``GENERIC_CONFIGS``, also in
``runs/generic/``) or ``--config``, then command-line flags. The resolved config is
written to the run directory and into every checkpoint.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
from typing import Any

import yaml

from pipeline.fetch import FetchOptions
from pipeline.remote import RetryPolicy
from srt.data import DATASET_ALIASES, DataConfig
from srt.model.init import INIT_SCHEMES
from srt.model import ModelConfig

_TRAINING = {'num_workers': 1, 'batch_size': 256, 'model_selection_metric': 'psnr',
             'model_selection_mode': 'maximize', 'print_every': 10, 'visualize_every': 5000,
             'validate_every': 5000, 'checkpoint_every': 1000, 'backup_every': 25000,
             'max_it': 4000000, 'decay_it': 4000000, 'lr_warmup': 2500}
_OCTAVES = {'pos_start_octave': -5}
# The reference's runs/<dataset>/<model>/config.yaml (stelzner/srt), shipped in runs/ too.
REFERENCE_CONFIGS: dict[str, dict[str, Any]] = {
    'nmr/srt': {'data': {'dataset': 'nmr', 'num_points': 8192},
                'model': {'encoder_kwargs': _OCTAVES, 'decoder': 'lightfield', 'decoder_kwargs': _OCTAVES},
                'training': {**_TRAINING, 'num_workers': 12, 'backup_every': 100000}},
    'nmr/vsrt': {'data': {'dataset': 'nmr', 'num_points': 256},
                 'model': {'encoder_kwargs': _OCTAVES, 'decoder': 'nerf', 'decoder_kwargs': _OCTAVES},
                 'training': {**_TRAINING, 'num_workers': 6, 'batch_size': 32}},
    'msn/srt': {'data': {'dataset': 'msn', 'num_points': 8192},
                'model': {'encoder_kwargs': _OCTAVES, 'decoder': 'lightfield', 'decoder_kwargs': _OCTAVES},
                'training': {**_TRAINING, 'backup_every': 100000}},
    'msn/isrt': {'data': {'dataset': 'msn', 'num_points': 8192, 'kwargs': {'canonical_view': False}},
                 'model': {'encoder': 'isrt', 'encoder_kwargs': _OCTAVES, 'decoder': 'isrt',
                           'decoder_kwargs': _OCTAVES},
                 'training': dict(_TRAINING)},
    'clevr3d/srt': {'data': {'dataset': 'clevr3d', 'num_points': 8192, 'kwargs': {'downsample': 1}},
                    'model': {'encoder_kwargs': _OCTAVES, 'decoder': 'lightfield',
                              'decoder_kwargs': _OCTAVES},
                    'training': {**_TRAINING, 'num_workers': 8}},
    'clevr3d/vsrt': {'data': {'dataset': 'clevr3d', 'num_points': 256, 'kwargs': {'downsample': 1}},
                     'model': {'encoder_kwargs': _OCTAVES, 'decoder': 'nerf', 'decoder_kwargs': _OCTAVES},
                     'training': {**_TRAINING, 'num_workers': 6, 'batch_size': 32}},
}
# The OSRT reference's runs/<dataset>/osrt/config.yaml (stelzner/osrt), shipped in runs/ too; its
# runs/msn/osrt (``dataset: osrt``, MSN-Hard) is our runs/msn_hard/osrt.
_OSRT_TRAINING = {**_TRAINING, 'visualize_every': 5000, 'validate_every': 5000, 'lr_warmup': 5000}


def _osrt(num_slots: int) -> dict[str, Any]:
    return {'encoder': 'osrt', 'encoder_kwargs': {**_OCTAVES, 'num_slots': num_slots},
            'decoder': 'slot_mixer', 'decoder_kwargs': _OCTAVES}


REFERENCE_CONFIGS.update({
    'msn_hard/osrt': {'data': {'dataset': 'osrt', 'num_points': 2304}, 'model': _osrt(32),
                      'training': {**_OSRT_TRAINING, 'num_workers': 1, 'visualize_every': 2000,
                                   'validate_every': 2000, 'checkpoint_every': 200, 'lr_warmup': 10000}},
    'clevr3d/osrt': {'data': {'dataset': 'clevr3d', 'num_points': 8192, 'kwargs': {'downsample': 1}},
                     'model': _osrt(6), 'training': {**_OSRT_TRAINING, 'num_workers': 8}},
    'obsurf_msn/osrt': {'data': {'dataset': 'obsurf_msn', 'num_points': 6144, 'path': 'data/multishapenet',
                                 'kwargs': {'downsample': 1}},
                        'model': _osrt(5),
                        'training': {**_OSRT_TRAINING, 'num_workers': 8, 'batch_size': 128,
                                     'lr_warmup': 2500}},
})


# Ours, for datasets outside SRT's (the importers' sets: RE10K, ACID, LVSM scenes, ...; runs/generic/
# <model>/config.yaml, its dataset name replaced by the shards'): the reference's MSN SRT with the
# generic data mode (srt/data.py): 2 random input views resized to 180x320 (RE10K's 360x640 halved:
# 2 x 23 x 40 = 1,840 tokens), 4 random targets of the other views at full size.
GENERIC_CONFIGS: dict[str, dict[str, Any]] = {
    'srt': {'data': {'dataset': 'generic', 'num_points': 8192,
                     'kwargs': {'num_input_views': 2, 'num_target_views': 4,
                                'input_size': [180, 320]}},
            'model': {'encoder_kwargs': _OCTAVES, 'decoder': 'lightfield',
                      'decoder_kwargs': _OCTAVES},
            'training': {**_TRAINING, 'backup_every': 100000}},
}


@dataclasses.dataclass
class TrainingConfig:
    """The YAML ``training`` section (reference names) and our additions."""
    batch_size: int = 256  # global: scenes per optimizer step over all ranks
    num_workers: int = 1  # data-loading processes per rank
    print_every: int = 10  # iterations between log lines / metrics.jsonl records
    visualize_every: int = 5000  # iterations between visualisation PNGs (0: never)
    validate_every: int = 5000  # iterations between evaluations (0: never)
    checkpoint_every: int = 1000  # iterations between model.pt writes
    backup_every: int = 25000  # iterations between model_<it>.pt copies (0: never)
    max_it: int = 4000000  # stop after this many iterations
    decay_it: int = 4000000  # LR decays by lr_decay over this many iterations after warmup
    lr_warmup: int = 2500  # iterations of linear warmup from 0 to lr
    model_selection_metric: str = 'psnr'  # metric that picks model_best.pt
    model_selection_mode: str = 'maximize'  # maximize | minimize
    num_coarse_samples: int = 128  # volumetric decoder: stratified samples per ray
    num_fine_samples: int = 64  # volumetric decoder: hierarchical samples per ray
    # ours
    lr: float = 1e-4  # peak learning rate (the reference's fixed value)
    lr_decay: float = 0.16  # factor per decay_it iterations (the reference's)
    seed: int = 0  # model init and data stream
    precision: str = 'auto'  # bf16 | fp32 | auto (bf16 where the device supports it)
    compile: bool | None = None  # torch.compile the model (None: on for CUDA, off on CPU)
    grad_accum: int = 1  # micro-batches per optimizer step (same global batch)
    checkpointing: bool = False  # activation checkpointing of transformer blocks
    eval_batch_size: int | None = None  # items per evaluation batch per rank (default batch/8)
    max_eval: int | None = None  # evaluate on the first N scenes only
    vis_scenes: int = 4  # scenes per visualisation grid
    shards_per_visit: int = 8  # shards a data worker interleaves
    item_buffer: int = 256  # items in a data worker's shuffle buffer
    deterministic: bool = False  # torch deterministic algorithms (tests of exact resume)
    init: str = 'reference'  # fresh weights: 'reference' (the model's reference init: PyTorch's for SRT,
    # JAX/ViT-style for OSRT), 'torch' (PyTorch defaults) or 'he' (srt/model/init.py)

    def __post_init__(self):
        if self.model_selection_mode not in ('maximize', 'minimize'):
            raise ValueError('training.model_selection_mode must be maximize or minimize')
        if self.init not in INIT_SCHEMES:
            raise ValueError(f'training.init must be one of {INIT_SCHEMES}, got {self.init!r}')
        if self.precision not in ('auto', 'bf16', 'fp32'):
            raise ValueError('training.precision (--precision) must be auto, bf16 or fp32')
        for name in ('batch_size', 'grad_accum', 'max_it', 'print_every'):
            if getattr(self, name) < 1:
                raise ValueError(f'training.{name} must be >= 1')

    def micro_batch(self, world_size: int) -> int:
        """Scenes per micro-batch per rank; ValueError unless the batch splits evenly."""
        if self.batch_size % world_size:
            raise ValueError(f'batch size {self.batch_size} is not divisible by the world size '
                             f'{world_size}')
        per_rank = self.batch_size // world_size
        if per_rank % self.grad_accum:
            raise ValueError(f'the per-rank batch {per_rank} is not divisible by --grad-accum '
                             f'{self.grad_accum}')
        return per_rank // self.grad_accum


@dataclasses.dataclass
class RunConfig:
    data: DataConfig
    model: ModelConfig
    training: TrainingConfig

    def to_dict(self) -> dict[str, Any]:
        d = self.data
        kwargs = {'canonical_view': d.canonical_view, 'max_objects': d.max_objects}
        if d.downsample is not None:
            kwargs['downsample'] = d.downsample
        if d.num_input_views != d.default_input_views:
            kwargs['num_input_views'] = d.num_input_views
        if d.train_on_inputs:
            kwargs['train_on_inputs'] = True
        for name in ('num_target_views', 'input_size'):
            if getattr(d, name) is not None:
                kwargs[name] = getattr(d, name)
        if d.masks is not None:
            kwargs['masks'] = d.masks
        return {'data': {'dataset': d.dataset, 'num_points': d.num_points, 'kwargs': kwargs},
                'model': self.model.to_dict(), 'training': dataclasses.asdict(self.training)}


def reference_config(dataset: str, model: str = 'srt') -> dict[str, Any]:
    """The reference config for a dataset (obsurf_msn uses CLEVR3D's where the reference has none);
    for a dataset outside SRT's, ours (``GENERIC_CONFIGS``)."""
    from srt.data import DATASETS, DATASET_ALIASES
    if DATASET_ALIASES.get(dataset, dataset) not in DATASETS:
        if model not in GENERIC_CONFIGS:
            raise ValueError(f'no config {model!r} for datasets outside SRT\'s ({dataset!r}); '
                             f'available: {sorted(GENERIC_CONFIGS)} (or pass --config)')
        cfg = copy.deepcopy(GENERIC_CONFIGS[model])
        cfg['data']['dataset'] = dataset
        return cfg
    key = f'{dataset}/{model}'
    if key not in REFERENCE_CONFIGS and dataset == 'obsurf_msn':
        key = f'clevr3d/{model}'
    if key not in REFERENCE_CONFIGS:
        have = sorted(k for k in REFERENCE_CONFIGS if k.startswith(key.split('/')[0]))
        raise ValueError(f'no reference config {key!r}; available: {have}')
    cfg = copy.deepcopy(REFERENCE_CONFIGS[key])
    cfg['data']['dataset'] = dataset
    return cfg


def config_dataset(raw: dict[str, Any]) -> str:
    """Our name of a raw config's dataset (the OSRT reference's ``osrt`` is ``msn_hard``)."""
    name = raw['data']['dataset']
    return DATASET_ALIASES.get(name, name)


def load_yaml(path: str) -> dict[str, Any]:
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    unknown = set(cfg) - {'data', 'model', 'training'}
    if unknown:
        raise ValueError(f'{path}: unknown top-level sections {sorted(unknown)}')
    return cfg


# Training settings that have a command-line flag (``add_override_flags``), by their config names.
TRAINING_OVERRIDES = ('batch_size', 'max_it', 'lr', 'lr_warmup', 'decay_it', 'precision', 'compile',
                      'seed', 'print_every', 'validate_every', 'visualize_every', 'checkpoint_every',
                      'backup_every', 'grad_accum', 'checkpointing', 'max_eval', 'deterministic',
                      'num_workers')


def add_override_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that override config settings: ``--num-points`` (data) and, with the destination
    names of ``TRAINING_OVERRIDES``, the training section's (None: not given)."""
    g = parser.add_argument_group('overrides of the config')
    g.add_argument('--batch-size', type=int, help='global batch (scenes per optimizer step)')
    g.add_argument('--num-points', type=int, help='target rays per scene')
    g.add_argument('--max-it', type=int)
    g.add_argument('--lr', type=float, help='peak learning rate')
    g.add_argument('--lr-warmup', type=int)
    g.add_argument('--decay-it', type=int)
    g.add_argument('--precision', choices=('auto', 'bf16', 'fp32'))
    g.add_argument('--compile', action=argparse.BooleanOptionalAction, default=None,
                   help='torch.compile the model (default: on for CUDA, off on CPU)')
    g.add_argument('--workers', type=int, dest='num_workers',
                   help='data-loading processes per rank')
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


@dataclasses.dataclass(frozen=True)
class FetchConfig:
    """How remote shards are read (docs/REMOTE.md): a machine's settings, not the run's, so they
    are flags only (not in the YAML or the checkpoint)."""
    cache_dir: str | None = None  # --cache-dir: keep verified remote shards here (LRU)
    cache_gb: float = 100.0  # --cache-gb: bound of the cache
    retries: int = 6  # --fetch-retries: failed attempts in a row before a shard is given up
    timeout: float = 60.0  # --fetch-timeout: seconds a connect or one read may block

    def __post_init__(self):
        if not self.cache_gb > 0:
            raise ValueError(f'--cache-gb must be > 0, got {self.cache_gb}')
        if self.retries < 0:
            raise ValueError(f'--fetch-retries must be >= 0, got {self.retries}')
        if not self.timeout > 0:
            raise ValueError(f'--fetch-timeout must be > 0 seconds, got {self.timeout}')
        if self.cache_dir is not None and os.path.exists(self.cache_dir) and \
                not os.path.isdir(self.cache_dir):
            raise ValueError(f'--cache-dir {self.cache_dir} is not a directory')

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> 'FetchConfig':
        return cls(args.cache_dir, args.cache_gb, args.fetch_retries, args.fetch_timeout)

    def options(self) -> FetchOptions:
        """The ``pipeline.fetch.ShardFetcher`` options of these settings."""
        return FetchOptions(cache_dir=self.cache_dir, cache_bytes=int(self.cache_gb * 2**30),
                            retry=RetryPolicy(retries=self.retries, timeout=self.timeout))


def add_fetch_flags(parser: argparse.ArgumentParser) -> None:
    """``--cache-dir``, ``--cache-gb``, ``--fetch-retries``, ``--fetch-timeout`` (FetchConfig)."""
    d = FetchConfig()
    g = parser.add_argument_group('remote shards (--shard-url http(s)://, pipe:, s3://, gs://)')
    g.add_argument('--cache-dir', help='keep remote shards here once their sha256 matches the '
                   'manifest (a local disk; shared by ranks, workers and runs)')
    g.add_argument('--cache-gb', type=float, default=d.cache_gb, help='size bound of --cache-dir '
                   '(least recently used shards are evicted)')
    g.add_argument('--fetch-retries', type=int, default=d.retries, help='failed reads of a shard '
                   'in a row (with backoff) before it is given up: skipped in training, an error '
                   'in evaluation')
    g.add_argument('--fetch-timeout', type=float, default=d.timeout,
                   help='seconds a connect or one read of a remote shard may block')


def resolve(dataset: str, config_path: str | None = None, model: str = 'srt',
            training: dict[str, Any] | None = None, num_points: int | None = None,
            full_scale: bool = False, shards: str = 'the shards') -> RunConfig:
    """The run config, resolved in the order above: ``config_path``'s YAML, else the reference
    config of ``dataset`` for ``model``; then the flags' ``training`` settings and ``num_points``
    (None keeps the config's). ValueError for a config of another dataset than ``shards`` hold,
    or a bad setting (naming it)."""
    raw = load_yaml(config_path) if config_path else reference_config(dataset, model)
    if raw['data']['dataset'] == GENERIC_CONFIGS['srt']['data']['dataset'] and \
            DataConfig(dataset).generic:
        raw['data']['dataset'] = dataset  # runs/generic/*: for any dataset outside SRT's
    if config_dataset(raw) != dataset:
        raise ValueError(f'the config is for dataset {raw["data"]["dataset"]!r} but {shards} '
                         f'holds {dataset!r} shards')
    return build(apply_overrides(raw, training or {}, num_points), full_scale=full_scale)


def apply_overrides(raw: dict[str, Any], training: dict[str, Any],
                    num_points: int | None = None) -> dict[str, Any]:
    """``raw`` with the given training settings (None: keep the config's) and ``num_points``."""
    section = raw.setdefault('training', {})
    for name, value in training.items():
        if name not in TRAINING_OVERRIDES:
            raise ValueError(f'training.{name} cannot be overridden')
        if value is not None:
            section[name] = value
    if num_points is not None:
        raw['data']['num_points'] = num_points
    return raw


def build(raw: dict[str, Any], full_scale: bool = False) -> RunConfig:
    """Dataclasses from a raw dict (unknown keys are errors naming the section)."""
    training = dict(raw.get('training') or {})
    names = {f.name for f in dataclasses.fields(TrainingConfig)}
    unknown = sorted(set(training) - names)
    if unknown:
        raise ValueError(f'training: unknown key(s) {unknown}')
    model = dict(raw.get('model') or {})
    model.setdefault('checkpointing', training.get('checkpointing', False))
    use_default_init = model.pop('use_default_init', None)  # the OSRT reference's model key
    if use_default_init is not None:
        init = 'torch' if use_default_init else 'reference'
        if training.setdefault('init', init) != init:
            raise ValueError(f'model.use_default_init: {use_default_init} contradicts training.init: '
                             f'{training["init"]!r}; set one of them')
    data = dict(raw['data'])
    if model.get('encoder') == 'osrt':
        # OSRT's reference loaders work in world coordinates whatever the config says
        # (stelzner/osrt osrt/data/core.py:17); a config may still ask for the canonical frame.
        data['kwargs'] = {'canonical_view': False, **(data.get('kwargs') or {})}
    model_cfg = ModelConfig.from_dict(model)
    data_cfg = DataConfig.from_yaml(data, full_scale=full_scale)
    data_cfg.model_masks = model_cfg.encoder == 'osrt'  # its decoders segment: score them
    return RunConfig(data=data_cfg, model=model_cfg, training=TrainingConfig(**training))


def model_name(model: ModelConfig) -> str:
    if model.decoder == 'nerf':
        return 'vsrt'
    if model.encoder == 'osrt':
        return 'osrt'
    return 'isrt' if model.encoder == 'isrt' else 'srt'
