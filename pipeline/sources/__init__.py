"""Source readers, one module per dataset. Each reader lists a split's scenes in the reference
loader's order (``scene_refs``) and reads them into ``pipeline.schema.SourceScene`` records
(``read``). Only ``pipeline.sources.msn`` imports TensorFlow, and only when it is opened."""
from __future__ import annotations

import os
from typing import Any, Iterator, Protocol, Sequence

from pipeline.schema import SourceError, SourceScene, png_info

DATASET_NAMES = ('nmr', 'clevr3d', 'obsurf_msn', 'msn', 'msn_hard')
# Importers of other projects' formats: format -> (module, class). Their dataset name is free text
# (``--dataset``, e.g. 're10k'); their scenes may differ in view count (``fixed_members = False``).
SOURCE_FORMATS = {'pixelsplat': ('pipeline.sources.pixelsplat', 'PixelSplatSource'),
                  'lvsm': ('pipeline.sources.lvsm', 'LVSMSource'),
                  'nerfstudio': ('pipeline.sources.nerfstudio', 'NerfstudioSource'),
                  'co3d': ('pipeline.sources.co3d', 'CO3DSource')}


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

    # Optional: ``fixed_members`` (default True: every scene of a split has the same members) and
    # ``split_files(split, keys) -> {file name: bytes}`` (files written next to the manifest, e.g.
    # an evaluation index keyed by the converted scenes' sample keys).


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


def read_view_image(path: str, view, scene) -> tuple[bytes, tuple[int, int, str, str]]:
    """(bytes, (width, height, mode, 'png'|'jpeg')) of a view's PNG or JPEG file, its structure
    checked from the headers (no decode); SourceError naming the file and scene if it is missing
    or not a whole PNG/JPEG."""
    from pipeline.schema import image_info
    if not os.path.isfile(path):
        raise SourceError(f'{path}: missing view image {view} (scene {scene})', scene, path)
    with open(path, 'rb') as f:
        data = f.read()
    return data, image_info(data, f'{path} (view {view} of scene {scene})')


def open_source(dataset: str, root: str, source_format: str | None = None, **kwargs) -> Source:
    """The reader of ``root``: by ``source_format`` (one of SOURCE_FORMATS; ``dataset`` is then the
    name used in keys), else by ``dataset`` (one of DATASET_NAMES)."""
    if source_format is not None:
        if source_format not in SOURCE_FORMATS:
            raise ValueError(f'unknown source format {source_format!r}; expected one of '
                             f'{tuple(SOURCE_FORMATS)}')
        if dataset in DATASET_NAMES:  # their names carry SRT's reference settings
            raise ValueError(f'--dataset {dataset!r} is one of SRT\'s datasets; name the '
                             f'{source_format} dataset otherwise (e.g. re10k)')
        import importlib
        module, name = SOURCE_FORMATS[source_format]
        return getattr(importlib.import_module(module), name)(root, dataset, **kwargs)
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
