"""Source readers, one module per dataset. Each reader lists a split's scenes in the reference
loader's order (``scene_refs``) and reads them into ``pipeline.schema.SourceScene`` records
(``read``). Only ``pipeline.sources.msn`` imports TensorFlow, and only when it is opened."""
from __future__ import annotations

import os
from typing import Any, Iterator, Protocol, Sequence

from pipeline.schema import SourceError, SourceScene, png_info

DATASET_NAMES = ('nmr', 'clevr3d', 'obsurf_msn', 'msn', 'msn_hard')


class Source(Protocol):
    dataset: str
    root: str

    def splits(self) -> list[str]: ...

    def scene_refs(self, split: str) -> list[Any]:
        """Cheap, JSON-able references to the scenes of a split, in the reference loader's order."""

    def read(self, split: str, refs: Sequence[Any], start_index: int) -> Iterator[SourceScene | SourceError]:
        """Read the scenes ``refs`` (a contiguous run of ``scene_refs(split)`` beginning at position
        ``start_index``), yielding per scene a SourceScene, or the SourceError that names what is
        wrong with it (the converter stops on it or, with --skip-bad, records it and goes on)."""

    def describe(self) -> dict[str, Any]:
        """JSON-able description of the source for manifests and the dataset card."""


def read_each(read_scene, split: str, refs: Sequence[Any], start_index: int
              ) -> Iterator[SourceScene | SourceError]:
    """``Source.read`` for readers with a per-scene ``read_scene(split, ref, index)``: a bad scene
    is yielded as its SourceError, and the next scenes are still read."""
    for i, ref in enumerate(refs):
        try:
            yield read_scene(split, ref, start_index + i)
        except SourceError as e:
            yield e


def read_view_png(path: str, view: int, scene) -> tuple[bytes, int, int]:
    """(PNG bytes, width, height) of a view's image file, its structure checked; SourceError
    naming the file and scene if it is missing or not a whole PNG."""
    if not os.path.isfile(path):
        raise SourceError(f'{path}: missing view image {view} (scene {scene})')
    with open(path, 'rb') as f:
        data = f.read()
    width, height, _, _ = png_info(data, path)
    return data, width, height


def open_source(dataset: str, root: str, **kwargs) -> Source:
    if dataset == 'nmr':
        from pipeline.sources.nmr import NMRSource
        return NMRSource(root)
    if dataset in ('clevr3d', 'obsurf_msn'):
        from pipeline.sources.obsurf import ObsurfSource
        return ObsurfSource(root, dataset, **kwargs)
    if dataset in ('msn', 'msn_hard'):
        from pipeline.sources.msn import MSNSource
        return MSNSource(root, dataset, **kwargs)
    raise ValueError(f'unknown dataset {dataset!r}; expected one of {DATASET_NAMES}')
