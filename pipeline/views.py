"""View samplers: which views of a scene one sample uses, as context (what a model sees) and target
(what it renders). Each is a small callable ``sampler(scene, rng, step, item=0) -> ViewChoice``:

- ``scene`` a ``pipeline.reader.Scene`` (only ``num_views`` and ``key`` are read: nothing decodes),
- ``rng`` a ``numpy.random.Generator`` the stream seeds per sample (seed, epoch, scene, item),
- ``step`` the training step the sample's batch belongs to (warm-up schedules),
- ``item`` which of the scene's samples when the stream makes several per scene (``EachViewAsInput``).

A scene a sampler cannot use raises ``SkipScene(reason)``: the stream counts it under
``skipped/<reason>`` and goes on (never silently). Indices are view numbers of the scene (the
shard's ``rgb_VVV`` order, which for video sources is time order).

Samplers: ``AllViews``; SRT's reference choices ``RandomInputs`` (MSN) and ``EachViewAsInput``
(NMR, ObSuRF); pixelSplat's ``BoundedSampler`` (``view_sampler_bounded.py``); ``LVSMSampler``
(LVSM's ``data/dataset_scene.py`` + ``utils/data_utils.py``); ``EvaluationIndex`` (pixelSplat's
evaluation index files).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import numpy as np


class SkipScene(Exception):
    """A scene a sampler (or an item builder) cannot use; ``reason`` is the short counted name."""

    def __init__(self, reason: str, detail: str = ''):
        super().__init__(f'{reason}: {detail}' if detail else reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class ViewChoice:
    """Context and target view indices; ``span``: the views a pose normalisation is computed over
    (LVSM: all V chosen views, some of which may be neither context nor target), None for context
    + target."""
    context: tuple[int, ...]
    target: tuple[int, ...] = ()
    span: tuple[int, ...] | None = None


def _ints(xs) -> tuple[int, ...]:
    return tuple(int(x) for x in xs)


@dataclasses.dataclass(frozen=True)
class AllViews:
    """Every view as context (and as target too with ``targets``)."""
    targets: bool = False

    def __call__(self, scene, rng, step: int = 0, item: int = 0) -> ViewChoice:
        views = tuple(range(scene.num_views))
        return ViewChoice(views, views if self.targets else ())


@dataclasses.dataclass(frozen=True)
class RandomInputs:
    """SRT's MSN rule: ``num_inputs`` distinct random views as context (their order matters: the
    first is canonical), targets the other views in increasing order, or every view
    (``targets='all'``)."""
    num_inputs: int = 5
    targets: str = 'rest'  # 'rest' | 'all'

    def __call__(self, scene, rng, step: int = 0, item: int = 0) -> ViewChoice:
        n = scene.num_views
        if n < self.num_inputs:
            raise SkipScene('too_short', f'{n} views < {self.num_inputs} inputs')
        inputs = _ints(rng.choice(n, self.num_inputs, replace=False))
        rest = tuple(v for v in range(n) if v not in inputs)
        return ViewChoice(inputs, tuple(range(n)) if self.targets == 'all' else rest)


@dataclasses.dataclass(frozen=True)
class EachViewAsInput:
    """SRT's NMR / ObSuRF rule: sample ``item`` has view ``item`` as its one context view (a
    stream with ``samples_per_scene = V`` enumerates them all); targets the other views in order
    (NMR, ``targets='rest'``) or every view (ObSuRF, ``'all'``)."""
    targets: str = 'rest'  # 'rest' | 'all'

    def __call__(self, scene, rng, step: int = 0, item: int = 0) -> ViewChoice:
        n = scene.num_views
        if not 0 <= item < n:
            raise SkipScene('too_short', f'no view {item} (the scene has {n})')
        targets = range(n) if self.targets == 'all' else (v for v in range(n) if v != item)
        return ViewChoice((item,), tuple(targets))


# ----------------------------------------------------------------------------- pixelSplat

@dataclasses.dataclass(frozen=True)
class BoundedSampler:
    """pixelSplat's bounded sampler (``view_sampler_bounded.py``, FORMATS.md 1.5): two context views
    ``gap`` frames apart, ``gap`` drawn in [min_gap, max_gap] which grow with the step during
    ``warm_up_steps``; ``num_target_views`` targets drawn WITH replacement inside the context span
    (at least ``min_distance_to_context_views`` from its ends); extra context views (more than 2)
    distinct and strictly inside the span, returned as (left, *extras, right).

    ``stage='test'``: gap = ``max_distance_between_context_views``, left = 0, targets every view of
    the span. A scene with too few views for the gap raises ``SkipScene('too_short')`` (pixelSplat
    skips it silently). Defaults: pixelSplat's RE10K/ACID settings (``bounded_re10k.yaml``).
    Deviations, each where pixelSplat would loop or index wrongly: fewer span-interior views than
    extra context views is a skip (pixelSplat's rejection loop never ends); with ``circular`` the
    extras are drawn before the wrap (pixelSplat draws them after wrapping ``right``)."""
    num_context_views: int = 2
    num_target_views: int = 4
    min_distance_between_context_views: int = 45
    max_distance_between_context_views: int = 45
    min_distance_to_context_views: int = 0
    warm_up_steps: int = 150_000
    initial_min_distance_between_context_views: int = 25
    initial_max_distance_between_context_views: int = 25
    stage: str = 'train'  # 'train' | 'val' | 'test'
    circular: bool = False  # cameras_are_circular
    overfit: bool = False  # is_overfitting: left = 0, right = max_gap

    def __post_init__(self):
        if self.stage not in ('train', 'val', 'test'):
            raise ValueError(f'BoundedSampler stage must be train, val or test, got {self.stage!r}')
        if self.num_context_views < 2:
            raise ValueError('BoundedSampler needs num_context_views >= 2')

    def schedule(self, initial: int, final: int, step: int) -> int:
        """pixelSplat's ``min(initial + int((final - initial) * step / warm_up_steps), final)``."""
        fraction = step / self.warm_up_steps
        return min(initial + int((final - initial) * fraction), final)

    def gap_bounds(self, num_views: int, step: int) -> tuple[int, int]:
        """(min_gap, max_gap) for a scene of ``num_views`` views at ``step``; raises SkipScene when
        the scene is too short."""
        if self.stage == 'test':
            min_gap = max_gap = self.max_distance_between_context_views
        elif self.warm_up_steps > 0:
            max_gap = self.schedule(self.initial_max_distance_between_context_views,
                                    self.max_distance_between_context_views, step)
            min_gap = self.schedule(self.initial_min_distance_between_context_views,
                                    self.min_distance_between_context_views, step)
        else:
            min_gap = self.min_distance_between_context_views
            max_gap = self.max_distance_between_context_views
        if not self.circular:
            max_gap = min(num_views - 1, max_gap)
        min_gap = max(2 * self.min_distance_to_context_views, min_gap)
        if max_gap < min_gap:
            raise SkipScene('too_short', f'{num_views} views; the context gap needs {min_gap} '
                            f'(<= {max_gap} possible)')
        return min_gap, max_gap

    def __call__(self, scene, rng, step: int = 0, item: int = 0) -> ViewChoice:
        n = scene.num_views
        min_gap, max_gap = self.gap_bounds(n, step)
        gap = int(rng.integers(min_gap, max_gap + 1))
        left = int(rng.integers(n if self.circular else n - gap))
        if self.stage == 'test':
            left = 0
        right = left + gap
        if self.overfit:
            left, right = 0, max_gap
        if self.stage == 'test':
            targets = np.arange(left, right + 1)
        else:
            d = self.min_distance_to_context_views
            targets = rng.integers(left + d, right + 1 - d, size=self.num_target_views)
        extras: list[int] = []
        n_extra = self.num_context_views - 2
        if n_extra:
            if right - left - 1 < n_extra:
                raise SkipScene('too_short', f'{right - left - 1} views inside the context span for '
                                f'{n_extra} extra context views')
            while len(set(extras)) != n_extra:
                extras = rng.integers(left + 1, right, size=n_extra).tolist()
        if self.circular:
            targets, right = targets % n, right % n
            extras = [e % n for e in extras]
        return ViewChoice(_ints([left, *extras, right]), _ints(targets))


# ----------------------------------------------------------------------------- LVSM

@dataclasses.dataclass(frozen=True)
class LVSMSampler:
    """LVSM's scene sampler (``dataset_scene.py`` ``view_selector`` + ``data_utils.fetch_views``,
    FORMATS.md 2.4): ``num_views`` views from a span of ``d`` frames, ``d`` in [min_frame_dist,
    min(V - 1, max_frame_dist)]: the span's two endpoints first, then ``num_views - 2`` distinct
    interior frames in random (unsorted) order. Context: the first ``num_input_views``. Targets:
    ``num_target_views`` distinct draws from all ``num_views`` chosen views (inputs included) with
    ``target_has_input`` (training), else the last ``num_target_views``. ``span`` is all chosen
    views: LVSM normalises poses over them (``camtransforms.lvsm_normalize``). A scene that is too
    short is a ``SkipScene('too_short')`` (LVSM silently loads a random other scene instead).
    Defaults: ``configs/LVSM_scene_decoder_only.yaml``."""
    num_views: int = 8
    num_input_views: int = 2
    num_target_views: int = 6
    min_frame_dist: int = 25
    max_frame_dist: int = 192
    target_has_input: bool = True

    def __post_init__(self):
        if not self.num_target_views < self.num_views:
            raise ValueError('LVSMSampler: num_target_views must be < num_views (LVSM asserts it)')
        if not self.target_has_input and self.num_input_views + self.num_target_views > self.num_views:
            raise ValueError('LVSMSampler: inputs + targets exceed num_views without target_has_input')

    def __call__(self, scene, rng, step: int = 0, item: int = 0) -> ViewChoice:
        n = scene.num_views
        if n < self.num_views:
            raise SkipScene('too_short', f'{n} views < {self.num_views}')
        max_dist = min(n - 1, self.max_frame_dist)
        if max_dist <= self.min_frame_dist:
            raise SkipScene('too_short', f'{n} views: frame distance {self.min_frame_dist} to '
                            f'{max_dist} is empty')
        dist = int(rng.integers(self.min_frame_dist, max_dist + 1))
        if dist - 1 < self.num_views - 2:
            raise SkipScene('too_short', f'{dist - 1} frames inside the span for '
                            f'{self.num_views - 2} views')
        start = int(rng.integers(0, n - dist))
        end = start + dist
        chosen = [start, end, *_ints(rng.choice(np.arange(start + 1, end), self.num_views - 2,
                                                replace=False))]
        if self.target_has_input:
            targets = [chosen[i] for i in rng.choice(self.num_views, self.num_target_views,
                                                     replace=False)]
        else:
            targets = chosen[self.num_views - self.num_target_views:]
        return ViewChoice(tuple(chosen[:self.num_input_views]), _ints(targets), tuple(chosen))


# ----------------------------------------------------------------------------- evaluation index

def evaluation_index_path(directory: str, split: str) -> str:
    return os.path.join(directory, f'{split}.evaluation_index.json')


class EvaluationIndex:
    """pixelSplat's evaluation index: ``{key: {"context": [...], "target": [...]} | null}``
    exactly (FORMATS.md 1.3), keyed by our sample keys. A ``null`` entry raises
    ``SkipScene('null_in_index')``, a scene missing from the index ``SkipScene('not_in_index')``,
    an entry naming a view the scene lacks ``SkipScene('index_out_of_range')`` (pixelSplat skips
    all three silently). ``nulls`` counts the file's null entries."""

    def __init__(self, entries: Mapping[str, Any], where: str = 'evaluation index'):
        if not isinstance(entries, Mapping):
            raise ValueError(f'{where}: not a JSON object of scene keys')
        self.entries: dict[str, tuple[tuple[int, ...], tuple[int, ...]] | None] = {}
        for key, entry in entries.items():
            if entry is None:
                self.entries[key] = None
                continue
            if not isinstance(entry, Mapping) or set(entry) != {'context', 'target'} or not all(
                    isinstance(entry[k], list) and all(isinstance(v, int) and not isinstance(v, bool)
                                                       for v in entry[k]) for k in entry):
                raise ValueError(f'{where}: entry {key!r} must be null or exactly '
                                 '{"context": [int, ...], "target": [int, ...]}')
            self.entries[key] = (tuple(entry['context']), tuple(entry['target']))
        self.where = where

    @classmethod
    def load(cls, path_or_directory: str, split: str | None = None) -> 'EvaluationIndex':
        """From a JSON file, or ``<split>.evaluation_index.json`` next to a split's manifest."""
        path = (evaluation_index_path(path_or_directory, split) if split is not None
                else path_or_directory)
        with open(path) as f:
            return cls(json.load(f), path)

    @property
    def nulls(self) -> int:
        return sum(1 for e in self.entries.values() if e is None)

    def __call__(self, scene, rng=None, step: int = 0, item: int = 0) -> ViewChoice:
        if scene.key not in self.entries:
            raise SkipScene('not_in_index', f'{scene.key} is not in {self.where}')
        entry = self.entries[scene.key]
        if entry is None:
            raise SkipScene('null_in_index', f'{scene.key} is null in {self.where}')
        context, target = entry
        if any(not 0 <= v < scene.num_views for v in context + target):
            raise SkipScene('index_out_of_range', f'{scene.key}: {self.where} names views outside '
                            f'0..{scene.num_views - 1}')
        return ViewChoice(context, target)
