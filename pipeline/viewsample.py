"""Samples of chosen views for any model: the stages between a scene and a batch,

    choose views (a ``pipeline.views`` sampler) -> decode those views (and their extras)
      -> camera transforms (opt-in stages over ``pipeline.camtransforms``) -> arrays -> collate

all module-level and picklable (they run inside DataLoader workers). ``ViewSamples`` chains them;
``pipeline.multiview.MultiViewStream`` calls it once per sample. A sample (before ``collate``):

    {'key': str, 'meta': the scene's meta.json dict,
     'context': {'index': int64 [c], 'image': [c, 3, h, w] uint8 (or float32 in [0, 1]),
                 'K': float32 [c, 3, 3] (pixels; normalised after NormalizeIntrinsics),
                 'c2w': float32 [c, 4, 4] world_from_cam, OpenCV axes,
                 'near'/'far': float32 [c] (with NearFar), <extra kind>: [c, h, w, ...] (extras)},
     'target': {... the same for the target views ...},
     'norm_from_world': float32 [4, 4] (the similarity the pose stages applied to the world)}
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from pipeline import camtransforms as ct
from pipeline.views import ViewChoice

ROLES = ('context', 'target')
RESERVED = ('index', 'image', 'K', 'c2w', 'near', 'far')


def read_views(scene, choice: ViewChoice, extras: Sequence[str] = ()) -> dict[str, Any]:
    """Decode the chosen views (only those) of a ``pipeline.reader.Scene`` and their ``extras``:
    images stay per view (views may differ in size until a ResizeCrop), cameras float64."""
    bad = [k for k in extras if k in RESERVED]
    if bad:
        raise ValueError(f'extras {bad} collide with sample fields {RESERVED}')
    sample: dict[str, Any] = {'key': scene.key, 'meta': scene.meta, 'norm_from_world': np.eye(4),
                              'world_scale': 1.0}
    for role, views in zip(ROLES, (choice.context, choice.target)):
        views = [int(v) for v in views]
        sample[role] = {'index': np.array(views, np.int64),
                        'image': [scene.image(v) for v in views],
                        'K': scene.K[views].copy(), 'c2w': scene.c2w[views].copy(),
                        **{kind: [scene.extra(kind, v) for v in views] for kind in extras}}
    span = choice.span if choice.span is not None else (*choice.context, *choice.target)
    sample['span_c2w'] = scene.c2w[[int(v) for v in span]].copy()
    return sample


def _apply_pose(sample: dict[str, Any], new_from_world: np.ndarray, scale: float = 1.0) -> None:
    """Re-express every pose of ``sample`` with the similarity ``new_from_world`` (rotation +
    translation, then positions divided by ``scale``)."""
    for role in ROLES:
        c2w = new_from_world @ sample[role]['c2w']
        c2w[..., :3, 3] /= scale
        sample[role]['c2w'] = c2w
    span = new_from_world @ sample['span_c2w']
    span[..., :3, 3] /= scale
    sample['span_c2w'] = span
    sample['norm_from_world'] = np.diag([1 / scale] * 3 + [1.0]) @ new_from_world @ \
        sample['norm_from_world']
    sample['world_scale'] /= scale


# ----------------------------------------------------------------------------- stages

@dataclasses.dataclass(frozen=True)
class ResizeCrop:
    """Resize every view to cover ``height`` x ``width`` and centre-crop it, K adjusted exactly
    (``camtransforms.resize_crop``); extras are resampled with ``extras_resample``."""
    height: int
    width: int
    resample: str = 'lanczos'
    extras_resample: str = 'nearest'

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        for role in ROLES:
            r = sample[role]
            sizes = [im.shape[:2] for im in r['image']]
            r['K'] = np.stack([ct.resize_crop_intrinsics(K, h, w, self.height, self.width)
                               for K, (h, w) in zip(r['K'], sizes)]) if sizes else r['K']
            r['image'] = [ct.resize_crop_image(im, self.height, self.width, self.resample)
                          for im in r['image']]
            for kind in set(r) - set(RESERVED):
                r[kind] = [ct.resize_crop_image(x, self.height, self.width, self.extras_resample)
                           for x in r[kind]]
        return sample


@dataclasses.dataclass(frozen=True)
class NormalizeIntrinsics:
    """pixelSplat's intrinsics: K divided by each view's image width and height."""

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        for role in ROLES:
            r = sample[role]
            if r['image']:
                hw = np.array([im.shape[:2] for im in r['image']], np.float64)
                r['K'] = ct.normalize_intrinsics(r['K'], hw[:, 0], hw[:, 1])
        return sample


@dataclasses.dataclass(frozen=True)
class RelativeToContext:
    """Poses relative to context view ``index`` (it becomes the identity)."""
    index: int = 0

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        _, ref_from_world = ct.relative_poses(sample['context']['c2w'], self.index)
        _apply_pose(sample, ref_from_world)
        return sample


@dataclasses.dataclass(frozen=True)
class LVSMNormalize:
    """LVSM's mean-pose re-centring and scaling over the sampler's span (all chosen views)."""
    scale_factor: float = 1.35

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        _, norm, scale = ct.lvsm_normalize(sample['span_c2w'], None, self.scale_factor)
        _apply_pose(sample, np.diag([scale] * 3 + [1.0]) @ norm, scale)  # rigid part, then 1/s
        return sample


@dataclasses.dataclass(frozen=True)
class NearFar:
    """Per-view ``near``/``far`` from the scene's metadata (``default`` when it states none),
    in the units of the poses (scaled with LVSMNormalize)."""
    default: tuple[float, float] | None = None

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        nf = ct.near_far(sample['meta']) or self.default
        if nf is None:
            raise ValueError(f'scene {sample["key"]}: meta.json states no near/far; give '
                             'NearFar(default=(near, far))')
        for role in ROLES:
            n = len(sample[role]['index'])
            sample[role]['near'] = np.full(n, nf[0] * sample['world_scale'], np.float32)
            sample[role]['far'] = np.full(n, nf[1] * sample['world_scale'], np.float32)
        return sample


# ----------------------------------------------------------------------------- arrays, batches

def finish(sample: dict[str, Any], dtype: str = 'uint8') -> dict[str, Any]:
    """Stack the views: images [n, 3, h, w] uint8 (or float32 in [0, 1]), cameras float32."""
    if dtype not in ('uint8', 'float32'):
        raise ValueError(f'image dtype must be uint8 or float32, not {dtype!r}')
    for role in ROLES:
        r = sample[role]
        sizes = {im.shape for im in r['image']}
        if len(sizes) > 1:
            raise ValueError(f'scene {sample["key"]}: {role} views of different sizes '
                             f'{sorted(s[:2] for s in sizes)}: add a ResizeCrop stage')
        h, w, c = r['image'][0].shape if r['image'] else (0, 0, 3)
        images = np.empty((len(r['image']), c, h, w), np.uint8)
        for i, im in enumerate(r['image']):  # per view: 10x faster than transposing the stack
            images[i] = im.transpose(2, 0, 1)
        r['image'] = images.astype(np.float32) / 255.0 if dtype == 'float32' else images
        r['K'], r['c2w'] = r['K'].astype(np.float32), r['c2w'].astype(np.float32)
        for kind in set(r) - set(RESERVED):
            r[kind] = np.stack(r[kind]) if r[kind] else np.zeros(0)
    sample['norm_from_world'] = sample['norm_from_world'].astype(np.float32)
    del sample['span_c2w']
    return sample


@dataclasses.dataclass(frozen=True)
class ViewSamples:
    """The item builder of the generic stream: ``sampler`` -> decode -> ``transforms`` -> arrays.
    Called as ``builder(scene, item, rng, step)`` by ``MultiViewStream``."""
    sampler: Callable
    transforms: Sequence[Callable] = ()
    extras: Sequence[str] = ()
    dtype: str = 'uint8'

    def __call__(self, scene, item: int, rng: np.random.Generator, step: int) -> dict[str, Any]:
        sample = read_views(scene, self.sampler(scene, rng, step, item), self.extras)
        for stage in self.transforms:
            sample = stage(sample)
        return finish(sample, self.dtype)


def collate(samples: Sequence[dict[str, Any]], path: str = '') -> dict[str, Any]:
    """Stack samples into a batch: arrays and numbers stacked along a new first axis, strings and
    ``meta`` dicts as lists; arrays of different shapes are an error naming the field."""
    out: dict[str, Any] = {}
    for k, first in samples[0].items():
        values = [s[k] for s in samples]
        if isinstance(first, dict) and k != 'meta':
            out[k] = collate(values, f'{path}{k}.')
        elif isinstance(first, (np.ndarray, int, float, np.number)):
            try:
                out[k] = np.stack([np.asarray(v) for v in values])
            except ValueError:
                raise ValueError(f'cannot batch {path}{k}: shapes '
                                 f'{sorted({np.shape(v) for v in values})} differ (add a ResizeCrop '
                                 'stage, or fix the number of views)') from None
        else:
            out[k] = values
    return out
