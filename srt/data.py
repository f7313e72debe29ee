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
- any other dataset (ours: the importers' sets, e.g. RE10K, ACID, LVSM scenes; any view count and
  image size): ``num_input_views`` (2) input views drawn at random, ``num_target_views`` (all the
  others by default) targets drawn at random from the other views (with replacement when fewer);
  one item per scene; canonical frame of the first input view (its ``meta.json`` rule,
  'input_view_pose': that camera's own frame). ``input_size`` resizes the input views (bilinear,
  their K scaled to match), e.g. to give a batch one input size when scenes differ.

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
import types
from typing import Any, Sequence

import numpy as np

from pipeline import cameras, views
from pipeline.reader import Scene

NUM_MSN_INPUT_VIEWS = 5
DATASETS = ('nmr', 'clevr3d', 'obsurf_msn', 'msn', 'msn_hard')  # SRT's and OSRT's; others: generic
# Names the reference configs use for our datasets: OSRT's runs/msn/osrt says ``dataset: osrt`` for
# MSN-Hard (its loader: MultishapenetDataset(osrt=True), i.e. multi_shapenet_conditional with
# instance images), which we call msn_hard.
DATASET_ALIASES = {'osrt': 'msn_hard'}
MSN_LIKE = ('msn', 'msn_hard')  # 10 views per scene, k random input views, the others targets
NUM_GENERIC_INPUT_VIEWS = 2
MASK_KIND = 'instance'  # the per-view extra holding instance ids (pipeline.schema extras)
# Per dataset: (one-hot channels, lowest id kept apart from the background) of the OSRT reference's
# masks: channel = clip(id, low, channels - 1 + low) - low.
MASK_CHANNELS = {'msn_hard': (34, 1), 'msn': (34, 1), 'clevr3d': (11, 0), 'obsurf_msn': (5, 0)}


@dataclasses.dataclass
class DataConfig:
    """The reference YAML's ``data`` section."""
    dataset: str  # nmr | clevr3d | obsurf_msn | msn | msn_hard (YAML alias: osrt); any other
    # name is a dataset of the generic mode (the shards' dataset, e.g. re10k)
    num_points: int = 2048  # target rays per item (the reference's default)
    canonical_view: bool = True  # express everything in the first input view's canonical frame
    downsample: int | None = None  # keep every 2^d-th input pixel (clevr3d/srt uses 1; the
    # reference has it for ObSuRF only, ours applies it to any dataset)
    max_objects: int = 6  # ObSuRF: drop scenes with more objects
    full_scale: bool = False  # targets: every pixel instead of num_points samples
    num_input_views: int | None = None  # MSN: input views per scene (the reference's 5; ours to
    # change); generic mode: 2 by default
    train_on_inputs: bool = False  # MSN, training only: the input views are targets too (ours;
    # evaluation always scores the other views)
    num_target_views: int | None = None  # generic mode: target views per item (None: the others)
    input_size: list[int] | None = None  # [h, w]: resize input views to it, K scaled (None: keep)
    object_masks: bool = False  # evaluation only (ours, not a YAML key): items carry which target
    # pixels show an object and where the scene came from (srt/objects.py)
    masks: bool | None = None  # instance masks in the items (ours): True needs them in every scene,
    # False never; None: where the scenes carry them, for MSN-Hard (the reference's 'dataset: osrt')
    # and the OSRT model (``model_masks``), as the OSRT reference's loaders do
    model_masks: bool = False  # set from the model section (slot decoders); not a YAML key

    def __post_init__(self):
        self.dataset = DATASET_ALIASES.get(self.dataset, self.dataset)
        if self.num_input_views is not None and self.dataset in DATASETS \
                and self.dataset not in MSN_LIKE and self.num_input_views != NUM_MSN_INPUT_VIEWS:
            raise ValueError('data.kwargs.num_input_views applies to msn_hard and msn only, and to '
                             'datasets outside SRT\'s (the others have one input view)')
        if self.num_input_views is None:
            self.num_input_views = NUM_GENERIC_INPUT_VIEWS if self.generic else NUM_MSN_INPUT_VIEWS
        if self.num_input_views < 1:
            raise ValueError('data.kwargs.num_input_views must be >= 1')
        if self.num_target_views is not None and (not self.generic or self.num_target_views < 1):
            raise ValueError('data.kwargs.num_target_views applies to datasets outside SRT\'s '
                             f'{DATASETS} and must be >= 1')
        if self.input_size is not None:
            if len(self.input_size) != 2 or min(self.input_size) < 1:
                raise ValueError(f'data.kwargs.input_size must be [height, width], got '
                                 f'{self.input_size}')
            if self.downsample:
                raise ValueError('data.kwargs: input_size and downsample exclude each other')
            self.input_size = [int(x) for x in self.input_size]
        if self.masks and self.dataset not in MASK_CHANNELS:
            raise ValueError(f'data.kwargs.masks: {self.dataset} has no instance masks (only '
                             f'{", ".join(MASK_CHANNELS)})')

    @classmethod
    def from_yaml(cls, data: dict[str, Any], full_scale: bool = False) -> 'DataConfig':
        kwargs = dict(data.get('kwargs') or {})
        known = {'canonical_view', 'downsample', 'max_objects', 'num_input_views', 'train_on_inputs',
                 'num_target_views', 'input_size', 'masks'}
        unknown = set(kwargs) - known
        if unknown:
            raise ValueError(f'data.kwargs has unknown keys {sorted(unknown)} (known: {sorted(known)})')
        return cls(dataset=data['dataset'], num_points=int(data.get('num_points', 2048)),
                   full_scale=full_scale, **kwargs)

    @property
    def obsurf(self) -> bool:
        return self.dataset in ('clevr3d', 'obsurf_msn')

    @property
    def generic(self) -> bool:
        """A dataset outside SRT's (the importers' sets): random inputs and targets, any views."""
        return self.dataset not in DATASETS

    @property
    def default_input_views(self) -> int:
        return NUM_GENERIC_INPUT_VIEWS if self.generic else NUM_MSN_INPUT_VIEWS

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
    return 1 if cfg.dataset in MSN_LIKE or cfg.generic else num_views


def reference_sampler(cfg: DataConfig) -> views.RandomInputs | views.EachViewAsInput:
    """The reference's view choice as a ``pipeline.views`` sampler: MSN ``num_input_views``
    random inputs, the other views as targets (all with ``train_on_inputs``); NMR each view as
    input, the others as targets; ObSuRF each view as input, every view as target."""
    if cfg.dataset in MSN_LIKE:
        return views.RandomInputs(cfg.num_input_views, 'all' if cfg.train_on_inputs else 'rest')
    return views.EachViewAsInput('rest' if cfg.dataset == 'nmr' else 'all')


def choose_views(cfg: DataConfig, num_views: int, item: int, rng: np.random.Generator
                 ) -> tuple[list[int], list[int]]:
    """(input views, target views) of a scene's ``item``-th item, as the reference chooses them
    (generic mode: see the module docstring)."""
    if cfg.generic:
        return generic_views(cfg, num_views, rng)
    choice = reference_sampler(cfg)(types.SimpleNamespace(num_views=num_views, key=''), rng, 0, item)
    return list(choice.context), list(choice.target)


def generic_views(cfg: DataConfig, num_views: int, rng: np.random.Generator
                  ) -> tuple[list[int], list[int]]:
    """Generic mode: ``num_input_views`` distinct random inputs (the first is canonical), then
    ``num_target_views`` random targets among the other views, sorted (drawn with replacement when
    there are fewer; None: all the others)."""
    k = cfg.num_input_views
    if num_views <= k:
        raise ValueError(f'a scene of {num_views} views has no target view besides {k} inputs')
    t = cfg.num_target_views
    if t is not None and k + t <= num_views:  # inputs and targets in one draw
        views = rng.choice(num_views, k + t, replace=False).tolist()
        return views[:k], sorted(views[k:])
    inputs = [int(v) for v in rng.choice(num_views, k, replace=False)]
    others = np.array(sorted(set(range(num_views)) - set(inputs)))
    if t is None:
        return inputs, [int(v) for v in others]
    return inputs, sorted(int(v) for v in rng.choice(others, t, replace=True))


def canonical_transform(cfg: DataConfig, scene: Scene, view: int) -> np.ndarray:
    """canonical_from_world [4, 4] float64 of the first input view (identity without canonical)."""
    if not cfg.canonical_view:
        return np.eye(4)
    return cameras.canonical_from_world(scene.meta['canonical_frame'], scene.K[view],
                                        scene.c2w[view], *scene.image_size(view), checked=True)


def make_item(cfg: DataConfig, scene: Scene, inputs: Sequence[int], targets: Sequence[int],
              rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    """The compact item (numpy) for the given views; ``rng`` draws the target pixels (None:
    ``cfg.full_scale`` must be set)."""
    T = canonical_transform(cfg, scene, inputs[0])
    views = list(inputs) + list(targets)
    k = len(inputs)
    K = scene.K[views]
    step = 2 ** cfg.downsample if cfg.downsample else 1
    start = step // 2
    if cfg.input_size is not None:
        input_images, K[:k] = resized_inputs(scene, inputs, cfg.input_size)
    M = T[:3, :3] @ scene.c2w[views, :3, :3] @ np.linalg.inv(K)  # [n, 3, 3]
    pos = scene.c2w[views, :3, 3] @ T[:3, :3].T + T[:3, 3]  # [n, 3]
    h, w = scene.image_size(_same_size(scene, targets, 'target')[0])
    num_pixels = len(targets) * h * w
    if cfg.full_scale:
        flat = np.arange(num_pixels)
    else:
        flat = rng.choice(num_pixels, cfg.num_points, replace=num_pixels < cfg.num_points) \
            if not cfg.generic else sorted_sample(rng, num_pixels, cfg.num_points)
    t_view, rem = np.divmod(flat, h * w)
    rows, cols = np.divmod(rem, w)
    # Decoding comes last: the small steps above run while their data is still in the CPU cache.
    if cfg.input_size is None:  # the views themselves: ``collate`` copies them into the batch once
        input_images = tuple(scene.image(v)[start::step, start::step]
                             for v in _same_size(scene, inputs, 'input'))
    if cfg.full_scale:
        target_pixels = np.concatenate([scene.image(v).reshape(-1, 3) for v in targets])
    else:
        # Generic mode: one item per scene, so its target views are not needed again.
        target_pixels = scene.gather(targets, flat, keep=not cfg.generic)
    item = {
        'input_images': input_images,  # [k, h', w', 3] uint8 (array or k arrays)
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
    if cfg.object_masks:
        from srt.objects import object_fields
        item.update(object_fields(scene, targets, flat))
    return item


def sorted_sample(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``k`` of ``range(n)`` drawn uniformly without replacement (with replacement when k > n),
    sorted: the generic mode's target pixels, grouped by view for ``Scene.gather``.

    Sparse draws (RE10K: 8192 of 921,600 pixels): a few more than ``k`` iid draws, sorted; their
    distinct values are a uniform subset of their count (by symmetry), and dropping a random
    surplus keeps it uniform. Half of ``np.sort(rng.choice(n, k, replace=False))``'s cost."""
    if k > n:
        return np.sort(rng.integers(0, n, k))
    if 8 * k > n or n >= 2**31:  # dense (many draws would repeat), or past int32
        return np.sort(rng.choice(n, k, replace=False))
    repeats = k * k / (2 * n)  # expected, for k + repeats draws; ~Poisson
    m = k + int(repeats + 4 * repeats ** 0.5) + 8
    while True:
        draw = np.sort(rng.integers(0, n, m, dtype=np.int32))
        keep = np.empty(m, bool)
        keep[0] = True
        np.not_equal(draw[1:], draw[:-1], out=keep[1:])
        distinct = draw[keep]
        if len(distinct) >= k:
            break
    if len(distinct) > k:
        distinct = np.delete(distinct, rng.choice(len(distinct), len(distinct) - k, replace=False))
    return distinct


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


def _same_size(scene: Scene, views: Sequence[int], what: str) -> Sequence[int]:
    sizes = {scene.image_size(v) for v in views}
    if len(sizes) > 1:
        from pipeline.reader import ShardError
        raise ShardError(f'{scene.where}: {what} views {list(views)} differ in size '
                         f'({sorted(sizes)}); set data.kwargs.input_size for inputs')
    return views


def resized_inputs(scene: Scene, views: Sequence[int], size: Sequence[int]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Input views resized to ``size`` [h, w] (bilinear, image corners kept) [k, h, w, 3] uint8, and
    their intrinsics scaled to match: K' = diag(w' / w, h' / h, 1) @ K (pixel centres stay at +0.5,
    as image coordinates scale with the image)."""
    from PIL import Image
    h1, w1 = size
    images, Ks = [], []
    for v in views:
        h, w = scene.image_size(v)
        img = scene.image(v)
        if (h, w) != (h1, w1):
            img = np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize(
                (w1, h1), Image.BILINEAR))
        images.append(img)
        Ks.append(np.diag([w1 / w, h1 / h, 1.0]) @ scene.K[v])
    return np.stack(images), np.stack(Ks)


def scene_item(cfg: DataConfig, scene: Scene, item: int, rng: np.random.Generator | None
               ) -> dict[str, Any]:
    """A scene's ``item``-th item: views chosen as the reference does (``choose_views``), the item
    built by ``make_item`` (both drawing from ``rng``), tagged with ``scene_key``."""
    inputs, targets = choose_views(cfg, scene.num_views, item, rng)
    out = make_item(cfg, scene, inputs, targets, rng)
    out['scene_key'] = scene.key
    return out


def keep_scene(cfg: DataConfig, scene: Scene) -> bool:
    """The reference's max_objects filter (ObSuRF); generic mode: scenes with a view to target
    besides the inputs."""
    if cfg.generic:
        return scene.num_views > cfg.num_input_views
    n = scene.meta.get('source', {}).get('num_objects')
    return not (cfg.obsurf and n is not None and n > cfg.max_objects)


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack items; string fields (scene keys) become lists. ValueError naming the field and the
    settings to change when items differ in shape (generic mode: scenes of other image sizes or
    view counts)."""
    out = {}
    for k in items[0]:
        values = [it[k] for it in items]
        if isinstance(values[0], str):
            out[k] = values
            continue
        if isinstance(values[0], tuple):  # an item's views (input_images): copied once, here
            shapes = {(len(x), *v.shape) for x in values for v in x}
            if len(shapes) == 1:
                out[k] = np.stack([v for x in values for v in x]).reshape(len(values),
                                                                           *shapes.pop())
                continue
        else:
            shapes = {np.shape(x) for x in values}
            if len(shapes) == 1:
                out[k] = np.stack(values)
                continue
        raise ValueError(f'items of one batch differ in {k} ({sorted(shapes)}; scenes '
                         f'{[it.get("scene_key") for it in items]}): set data.kwargs.input_size '
                         '(input image size) and num_target_views (targets per item)')
    return out


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
