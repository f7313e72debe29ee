"""SRT examples from shard scenes, exactly as the reference loaders build them.

An *item* is one model input: k input views and target rays, built from a ``pipeline.reader.Scene``.
Per dataset (the reference's loaders: stelzner/srt ``srt/data/{nmr,obsurf,multishapenet}.py``):

- ``nmr``: one input view, the targets are the other views in increasing order; an epoch of the
  reference enumerates every (scene, input view) pair, so a scene yields one item per input view.
- ``clevr3d`` / ``obsurf_msn``: one input view (optionally downsampled, ``downsample: d`` keeps
  every 2^d-th pixel from 2^(d-1)), the targets are *all* views; one item per input view; scenes
  with more than ``max_objects`` objects are dropped.
- ``msn``: 5 input views drawn at random without replacement (their order matters: the first is
  canonical), the targets are the other views in increasing order; one item per scene.
  (``num_input_views`` and ``downsample`` for MSN are our additions, for small CPU configs.)

Targets are ``num_points`` pixels drawn uniformly without replacement from all target pixels (with
replacement only when there are fewer), or every pixel in row-major order per target view
(``full_scale``). Everything is expressed in the canonical frame of the first input view unless
``canonical_view`` is False.

Instance masks (OSRT; ``masks``): per pixel the one-hot channel of the reference's loaders, kept as
uint8 channel ids in the item (``input_mask_ids`` at the input resolution, downsampling included;
``target_mask_ids`` at the target pixels' indices) and one-hot on the device. MSN-Hard: instance
ids ``clip(1, 34) - 1`` over 34 channels, channel 0 the background (ids 0 and 1; stelzner/osrt
``osrt/data/multishapenet.py:109-121``); CLEVR3D / ObSuRF-MSN: the mask id itself over 11 / 5
channels, 0 the background (``osrt/data/obsurf.py:46,91-94``).

Items are compact (the loader's hot path): uint8 pixels, and per view the 3x3 matrix
``M = canonical_from_world[:3, :3] @ R @ inv(K)`` (float64 on the CPU, then float32) and the
camera position; ``to_model_inputs`` turns a batch of them into the reference's float tensors on
the training device, computing ray directions ``normalise(M @ [u + 0.5, v + 0.5, 1])`` there.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Sequence

import numpy as np

from pipeline import cameras
from pipeline.reader import Scene

NUM_MSN_INPUT_VIEWS = 5
DATASETS = ('nmr', 'clevr3d', 'obsurf_msn', 'msn', 'msn_hard')
# Names the reference configs use for our datasets: OSRT's runs/msn/osrt says ``dataset: osrt`` for
# MSN-Hard (its loader: MultishapenetDataset(osrt=True), i.e. multi_shapenet_conditional with
# instance images), which we call msn_hard.
DATASET_ALIASES = {'osrt': 'msn_hard'}
MSN_LIKE = ('msn', 'msn_hard')  # 10 views per scene, k random input views, the others targets
MASK_KIND = 'instance'  # the per-view extra holding instance ids (pipeline.schema extras)
# Per dataset: (one-hot channels, lowest id kept apart from the background) of the OSRT reference's
# masks: channel = clip(id, low, channels - 1 + low) - low.
MASK_CHANNELS = {'msn_hard': (34, 1), 'msn': (34, 1), 'clevr3d': (11, 0), 'obsurf_msn': (5, 0)}


@dataclasses.dataclass
class DataConfig:
    """The reference YAML's ``data`` section."""
    dataset: str  # nmr | clevr3d | obsurf_msn | msn | msn_hard (YAML alias: osrt)
    num_points: int = 2048  # target rays per item (the reference's default)
    canonical_view: bool = True  # express everything in the first input view's canonical frame
    downsample: int | None = None  # keep every 2^d-th input pixel (clevr3d/srt uses 1; the
    # reference has it for ObSuRF only, ours applies it to any dataset)
    max_objects: int = 6  # ObSuRF: drop scenes with more objects
    full_scale: bool = False  # targets: every pixel instead of num_points samples
    num_input_views: int = NUM_MSN_INPUT_VIEWS  # MSN: input views per scene (the reference's 5; ours to change)
    train_on_inputs: bool = False  # MSN, training only: the input views are targets too (ours;
    # evaluation always scores the other views)
    masks: bool | None = None  # instance masks in the items (ours): True needs them in every scene,
    # False never; None: where the scenes carry them, for MSN-Hard (the reference's 'dataset: osrt')
    # and the OSRT model (``model_masks``), as the OSRT reference's loaders do
    model_masks: bool = False  # set from the model section (slot decoders); not a YAML key

    def __post_init__(self):
        self.dataset = DATASET_ALIASES.get(self.dataset, self.dataset)
        if self.dataset not in DATASETS:
            raise ValueError(f'data.dataset {self.dataset!r} is not one of {", ".join(DATASETS)} '
                             f'(or an alias: {DATASET_ALIASES})')
        if self.num_input_views != 5 and self.dataset not in MSN_LIKE:
            raise ValueError('data.kwargs.num_input_views applies to msn_hard and msn only (the others '
                             'have one input view)')
        if self.masks and self.dataset not in MASK_CHANNELS:
            raise ValueError(f'data.kwargs.masks: {self.dataset} has no instance masks (only '
                             f'{", ".join(MASK_CHANNELS)})')

    @classmethod
    def from_yaml(cls, data: dict[str, Any], full_scale: bool = False) -> 'DataConfig':
        kwargs = dict(data.get('kwargs') or {})
        known = {'canonical_view', 'downsample', 'max_objects', 'num_input_views', 'train_on_inputs',
                 'masks'}
        unknown = set(kwargs) - known
        if unknown:
            raise ValueError(f'data.kwargs has unknown keys {sorted(unknown)} (known: {sorted(known)})')
        return cls(dataset=data['dataset'], num_points=int(data.get('num_points', 2048)),
                   full_scale=full_scale, **kwargs)

    @property
    def obsurf(self) -> bool:
        return self.dataset in ('clevr3d', 'obsurf_msn')

    def wants_masks(self, scene: Scene) -> bool:
        """Whether the items of ``scene`` carry instance masks (``masks``); ValueError naming the
        scene when ``masks`` is True and it has none."""
        if self.masks is False or self.dataset not in MASK_CHANNELS:
            return False
        has = MASK_KIND in scene.meta.get('extras', ())
        if self.masks and not has:
            raise ValueError(f'{scene.where}: no {MASK_KIND} masks (data.kwargs.masks is true; convert '
                             'a source that has them, or set it to false)')
        return has and (self.masks or self.dataset == 'msn_hard' or self.model_masks)


def key_seed(key: str, seed: int = 0) -> list[int]:
    """SeedSequence entropy from a scene key: evaluation draws are reproducible per scene."""
    digest = hashlib.sha256(f'{seed}:{key}'.encode()).digest()
    return [int.from_bytes(digest[i:i + 4], 'little') for i in range(0, 16, 4)]


# ----------------------------------------------------------------------------- per scene

def items_per_scene(cfg: DataConfig, num_views: int) -> int:
    return 1 if cfg.dataset in MSN_LIKE else num_views


def choose_views(cfg: DataConfig, num_views: int, item: int, rng: np.random.Generator
                 ) -> tuple[list[int], list[int]]:
    """(input views, target views) of a scene's ``item``-th item, as the reference chooses them."""
    if cfg.dataset in MSN_LIKE:
        inputs = [int(v) for v in rng.choice(num_views, cfg.num_input_views, replace=False)]
        if cfg.train_on_inputs:
            return inputs, list(range(num_views))
        return inputs, sorted(set(range(num_views)) - set(inputs))
    if cfg.dataset == 'nmr':
        return [item], [v for v in range(num_views) if v != item]
    return [item], list(range(num_views))  # ObSuRF: the input view is a target too


def canonical_transform(cfg: DataConfig, scene: Scene, view: int) -> np.ndarray:
    """canonical_from_world [4, 4] float64 of the first input view (identity without canonical)."""
    if not cfg.canonical_view:
        return np.eye(4)
    return cameras.canonical_from_world(scene.meta['canonical_frame'], scene.K[view],
                                        scene.c2w[view], scene.height, scene.width)


def make_item(cfg: DataConfig, scene: Scene, inputs: Sequence[int], targets: Sequence[int],
              rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    """The compact item (numpy) for the given views; ``rng`` draws the target pixels (None:
    ``cfg.full_scale`` must be set)."""
    T = canonical_transform(cfg, scene, inputs[0])
    views = list(inputs) + list(targets)
    M = T[:3, :3] @ scene.c2w[views, :3, :3] @ np.linalg.inv(scene.K[views])  # [n, 3, 3]
    pos = scene.c2w[views, :3, 3] @ T[:3, :3].T + T[:3, 3]  # [n, 3]
    k, h, w = len(inputs), scene.height, scene.width
    step = 2 ** cfg.downsample if cfg.downsample else 1
    start = step // 2
    input_images = np.stack([scene.image(v)[start::step, start::step] for v in inputs])
    num_pixels = len(targets) * h * w
    if cfg.full_scale:
        flat = np.arange(num_pixels)
    else:
        flat = rng.choice(num_pixels, cfg.num_points, replace=num_pixels < cfg.num_points)
    t_view, rem = np.divmod(flat, h * w)
    rows, cols = np.divmod(rem, w)
    if cfg.full_scale:
        target_pixels = np.concatenate([scene.image(v).reshape(-1, 3) for v in targets])
    else:
        target_pixels = scene.gather(targets, flat)
    item = {
        'input_images': input_images,  # [k, h', w', 3] uint8
        'input_M': M[:k].astype(np.float32),  # [k, 3, 3]
        'input_pos': pos[:k].astype(np.float32),  # [k, 3]
        'target_pixels': target_pixels,  # [p, 3] uint8
        'target_uv': np.stack([cols, rows], -1).astype(np.int16),  # [p, 2] (u, v)
        'target_view': t_view.astype(np.int16),  # [p] index into the target cameras
        'target_M': M[k:].astype(np.float32),  # [t, 3, 3]
        'target_pos': pos[k:].astype(np.float32),  # [t, 3]
        'input_grid': np.array([start, step], np.int16),  # input pixel (j) centre: start+step*j+.5
        'target_hw': np.array([h, w], np.int16),  # target image size (full-scale targets are images)
    }
    if cfg.canonical_view:
        item['transform'] = T.astype(np.float32)
    if cfg.wants_masks(scene):
        channels, low = MASK_CHANNELS[cfg.dataset]
        masks = {v: mask_channels(scene, v, channels, low) for v in dict.fromkeys(views)}
        item['input_mask_ids'] = np.stack([masks[v][start::step, start::step] for v in inputs])
        item['target_mask_ids'] = np.stack([masks[v] for v in targets]).reshape(-1)[flat]
        item['mask_channels'] = np.array(channels, np.int16)
    return item


def mask_channels(scene: Scene, view: int, channels: int, low: int) -> np.ndarray:
    """[h, w] uint8 one-hot channel of every pixel of ``view``'s instance mask: the id clipped to
    [low, channels - 1 + low], minus ``low`` (MSN-Hard: ``clip(1, 34) - 1``). Ids past the last
    channel are folded into it where ``low`` > 0, as the reference's clip does; without a clip in
    the reference (ObSuRF sets) they are an error naming the view."""
    ids = scene.extra(MASK_KIND, view)
    ids = ids[..., 0] if ids.ndim == 3 else ids
    if low == 0 and ids.max(initial=0) >= channels:
        raise ValueError(f'{scene.where} view {view}: instance id {int(ids.max())} does not fit the '
                         f"reference's {channels} mask channels")
    return (np.clip(ids, low, channels - 1 + low) - low).astype(np.uint8)


def scene_item(cfg: DataConfig, scene: Scene, item: int, rng: np.random.Generator | None
               ) -> dict[str, Any]:
    """A scene's ``item``-th item: views chosen as the reference does (``choose_views``), the item
    built by ``make_item`` (both drawing from ``rng``), tagged with ``scene_key``."""
    inputs, targets = choose_views(cfg, scene.num_views, item, rng)
    out = make_item(cfg, scene, inputs, targets, rng)
    out['scene_key'] = scene.key
    return out


def keep_scene(cfg: DataConfig, scene: Scene) -> bool:
    """The reference's max_objects filter (ObSuRF)."""
    n = scene.meta.get('source', {}).get('num_objects')
    return not (cfg.obsurf and n is not None and n > cfg.max_objects)


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack items; string fields (scene keys) become lists."""
    return {k: ([it[k] for it in items] if isinstance(items[0][k], str)
                else np.stack([it[k] for it in items])) for k in items[0]}


# ----------------------------------------------------------------------------- on the device

def _directions(M, u, v):
    """normalise(M @ [u, v, 1]) for M [..., 3, 3] and pixel-centre coordinates u, v [...]."""
    d = M[..., :, 0] * u[..., None] + M[..., :, 1] * v[..., None] + M[..., :, 2]
    return d / d.norm(dim=-1, keepdim=True)


def to_model_inputs(batch: dict[str, Any], device=None, non_blocking: bool = True
                    ) -> dict[str, Any]:
    """A collated batch of items -> the reference's batch (float32 tensors on ``device``).

    Keys: input_images [b,k,3,h,w] in [0,1], input_camera_pos [b,k,3], input_rays [b,k,h,w,3],
    target_pixels [b,p,3], target_camera_pos [b,p,3], target_rays [b,p,3], transform [b,4,4] (when
    canonical); with masks target_masks [b,p,c] one-hot and input_mask_ids [b,k,h,w] int64. No
    host-device synchronisation.
    """
    import torch

    def t(x):
        x = torch.as_tensor(x)
        return x.to(device, non_blocking=non_blocking) if device is not None else x

    images = t(batch['input_images'])  # [b, k, h, w, 3] uint8
    b, k, h, w, _ = images.shape
    input_M, target_M = t(batch['input_M']), t(batch['target_M'])
    grid = batch['input_grid'][0]  # identical for every item of a dataset config
    start, step = int(grid[0]), int(grid[1])
    dtype, dev = input_M.dtype, input_M.device
    v, u = torch.meshgrid(torch.arange(h, device=dev, dtype=dtype) * step + (start + 0.5),
                          torch.arange(w, device=dev, dtype=dtype) * step + (start + 0.5),
                          indexing='ij')
    input_rays = _directions(input_M[:, :, None, None], u, v)  # [b, k, h, w, 3]
    uv = t(batch['target_uv']).to(dtype) + 0.5  # [b, p, 2]
    view = t(batch['target_view']).long()  # [b, p]
    M = torch.gather(target_M, 1, view[..., None, None].expand(-1, -1, 3, 3))  # [b, p, 3, 3]
    target_pos = torch.gather(t(batch['target_pos']), 1, view[..., None].expand(-1, -1, 3))
    out = {
        'input_images': images.permute(0, 1, 4, 2, 3).to(dtype) / 255.0,
        'input_camera_pos': t(batch['input_pos']),
        'input_rays': input_rays,
        'target_pixels': t(batch['target_pixels']).to(dtype) / 255.0,
        'target_camera_pos': target_pos,
        'target_rays': _directions(M, uv[..., 0], uv[..., 1]),
    }
    if 'transform' in batch:
        out['transform'] = t(batch['transform'])
    if 'target_mask_ids' in batch:
        channels = int(batch['mask_channels'][0])
        # The reference's target_masks [b, p, channels] (float, as its trainer scores them); the
        # input masks stay ids [b, k, h, w] (their one-hot is F.one_hot(ids, channels)).
        out['target_masks'] = torch.nn.functional.one_hot(
            t(batch['target_mask_ids']).long(), channels).to(dtype)
        out['input_mask_ids'] = t(batch['input_mask_ids']).long()
    return out
