"""The shard schema: the single table of member names, encodings and scene metadata (docs/SHARDS.md).

One WebDataset sample per scene; its key is ``<dataset>_<split>_<scene id>`` with every character
outside [A-Za-z0-9_-] replaced by '-' (WebDataset splits member names at the first dot). Members:

===================  ==========================================================================
``meta.json``        scene metadata (see ``scene_meta``), UTF-8 JSON with sorted keys
``cameras.npz``      ``K`` [V, 3, 3] float64 (pixels, pixel centres at +0.5) and ``c2w`` [V, 4, 4]
                     float64 (world_from_cam, OpenCV axes), raw world units; an uncompressed npz
                     readable with ``numpy.load(..., allow_pickle=False)``
``rgb_<vvv>.png``    view ``vvv`` (000, 001, ...), the source's image bytes unchanged: PNG (RGB or
``rgb_<vvv>.jpg``    RGBA) or JPEG, one format per scene; views may differ in size (``image_sizes``)
``<kind>_<vvv>.png`` per-view extras the source has (``category``, ``instance``, ``depth``, ``mask``),
                     bytes unchanged; extras that are arrays in the source are ``<kind>_<vvv>.npy``
``rays.npy.zst``     only with ``--bake-rays`` and views of one size: ray directions [V, H, W, 3]
                     float32, zstd-compressed npy (origins are ``c2w[:, :3, 3]``)
===================  ==========================================================================

Scenes of a split share their member names when they have as many views and the same extras (the
split's manifest lists them; else its ``members`` is null). Bumping ``SCHEMA_VERSION`` is required
for any change a reader could notice; readers accept every version in ``READABLE_SCHEMA_VERSIONS``.
"""
from __future__ import annotations

import dataclasses
import re
import struct
import zlib
from typing import Any

import numpy as np

from pipeline import cameras
from pipeline.serialize import json_bytes, npy_bytes, npz_bytes  # noqa: F401 (re-exported)

SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
POSE_CONVENTION = 'c2w_opencv'
META = 'meta.json'
CAMERAS = 'cameras.npz'
RAYS = 'rays.npy.zst'
RGB_PREFIX = 'rgb'
IMAGE_EXTS = {'png': 'png', 'jpeg': 'jpg'}  # image format (meta.json image_format) -> member ext
# Not a shard member: the file by which the converter's dataset card recognises a source directory
# written by ``pipeline.synthetic`` (which writes it).
SYNTHETIC_MARKER = 'srt_shards_synthetic.json'

# SRT's (and OSRT's) datasets: the reference loader's render range (near/far, used by the volumetric
# decoder) and canonical-frame rule (the reference's ``render_kwargs`` of each dataset class are the
# source), and what meta.json states about the source's cameras and world. Other datasets (the
# importers' formats) carry these in their SourceScene.
_NMR_WORLD = {'description': "DVR's world rotated by the reference loader (x, y, z) -> (x, -z, y), "
                             'z up', 'applied_transform': cameras.NMR_WORLD_ROTATION.tolist()}
_SUNDS = dict(source_format='tfds_sunds_frames',
              source_camera_convention='sunds extrinsics camera_from_frame [R | t] OpenCV axes, '
                                       'frame pose, K in pixels (pixel centres at +0.5)',
              camera_conversion='c2w = frame pose @ inv([R | t]); K unchanged',
              world_frame="sunds' scene frame (Kubric world, z up)")
_OBSURF = dict(source_format='obsurf',
               source_camera_convention='camera position looking at the origin, z up; pinhole '
                                        'focal 0.035, sensor width 0.032',
               camera_conversion="c2w = look-at(camera_pos, origin, z up); K from ObSuRF's "
                                 'focal length and sensor width',
               world_frame="ObSuRF's world (z up)")
DATASETS: dict[str, dict[str, Any]] = {
    'nmr': dict(near=2.0, far=4.0, canonical_frame='input_view_pose',
                near_far_source='stelzner/srt srt/data/nmr.py NMRDataset.render_kwargs',
                source_format='nmr',
                source_camera_convention="DVR cameras.npz world_mat / camera_mat (normalised image "
                                         'coordinates on an edge-to-edge linspace(-1, 1) grid)',
                camera_conversion='c2w = rotation @ world_mat_inv with OpenCV axes; K absorbs '
                                  'camera_mat and the linspace grid',
                world_frame=_NMR_WORLD),
    'clevr3d': dict(near=0.035, far=35.0, canonical_frame='look_at_origin',
                    near_far_source='stelzner/srt srt/data/obsurf.py Clevr3dDataset.render_kwargs',
                    **_OBSURF),
    'obsurf_msn': dict(near=0.035, far=35.0, canonical_frame='look_at_origin',
                       near_far_source='stelzner/srt srt/data/obsurf.py Clevr3dDataset.render_kwargs',
                       **_OBSURF),
    'msn': dict(near=0.0, far=20.0, canonical_frame='center_columns_rays',
                near_far_source='stelzner/srt srt/data/multishapenet.py '
                                'MultishapenetDataset.render_kwargs', **_SUNDS),
    'msn_hard': dict(near=0.0, far=20.0, canonical_frame='center_columns_rays',
                     near_far_source='stelzner/osrt osrt/data/multishapenet.py '
                                     'MultishapenetDataset.render_kwargs', **_SUNDS),
}
# The canonical-frame rule of datasets outside DATASETS (the first input view's own camera).
DEFAULT_CANONICAL_FRAME = 'input_view_pose'

_KEY_UNSAFE = re.compile(r'[^A-Za-z0-9_-]')


class SourceError(ValueError):
    """Bad source data; the message names the file and the scene (also kept as ``scene_id`` and
    ``source_file`` where the reader gives them, for the skipped-scene log)."""

    def __init__(self, message: str, scene_id: Any = None, source_file: str | None = None):
        super().__init__(message)
        self.scene_id, self.source_file = scene_id, source_file


def rgb_member(view: int, ext: str = 'png') -> str:
    """'rgb_003.png' (or, with ``ext`` 'jpg', 'rgb_003.jpg')."""
    return f'{RGB_PREFIX}_{view:03d}.{ext}'


def extra_member(kind: str, view: int, ext: str) -> str:
    return f'{kind}_{view:03d}.{ext}'


_RGB_MEMBER = re.compile(rf'{RGB_PREFIX}_(\d{{3,}})\.(?:png|jpg)')


def rgb_view(member: str) -> int | None:
    """The view index of an RGB member name, None for any other member.

    >>> rgb_view('rgb_012.png'), rgb_view('rgb_003.jpg'), rgb_view('category_012.png')
    (12, 3, None)
    """
    m = _RGB_MEMBER.fullmatch(member)
    return int(m.group(1)) if m else None


def scene_key(dataset: str, split: str, scene_id) -> str:
    """Stable unique sample key without dots, e.g. ``nmr_train_02958343-scene00007``."""
    return _KEY_UNSAFE.sub('-', f'{dataset}_{split}_{scene_id}')


@dataclasses.dataclass
class SourceScene:
    """One scene as a source reader yields it, before encoding into a shard sample.

    The provenance fields (``source_format`` ... ``canonical_frame``) default to None: for the
    datasets of ``DATASETS`` their values come from that table, other readers set them."""
    dataset: str  # 'nmr' | 'clevr3d' | 'obsurf_msn' | 'msn' | 'msn_hard', or free text ('re10k', ...)
    split: str
    scene_id: Any  # the source's scene id, verbatim (str or int)
    reference_index: int  # position of the scene in the reference loader's order for this split
    view_names: list[str]  # the source's name of each view, in stored order
    images: list[bytes]  # PNG or JPEG bytes per view (one format per scene), unchanged
    K: np.ndarray  # [V, 3, 3] pixels
    c2w: np.ndarray  # [V, 4, 4] world_from_cam, OpenCV axes
    extras: dict[str, list[bytes]] = dataclasses.field(default_factory=dict)  # kind -> per view
    extras_ext: dict[str, str] = dataclasses.field(default_factory=dict)  # kind -> 'png' | 'jpg' | 'npy'
    source_meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # JSON-able extras
    origin: str = ''  # source file(s) for error messages
    checksummed: bool = False  # the source verified a checksum over these bytes (TFRecord CRC32C)
    timestamps: list[int] | None = None  # per view, the source's (e.g. RE10K microseconds)
    source_format: str | None = None  # e.g. 'pixelsplat_chunks'
    source_camera_convention: str | None = None  # what the source stores
    camera_conversion: str | None = None  # what was done to reach ours, one sentence
    distortion: dict[str, Any] | None = None  # {'model', 'coeffs', 'note'}: images as captured
    world_frame: Any = None  # provenance of the world frame (str or dict)
    extras_info: dict[str, Any] = dataclasses.field(default_factory=dict)  # kind -> its encoding
    near: float | None = None  # render range in world units, where the source states one
    far: float | None = None
    near_far_source: str | None = None
    up_axis: list[float] | None = None  # the world's up axis where the source states one
    canonical_frame: str | None = None  # None: DATASETS' rule, else DEFAULT_CANONICAL_FRAME

    @property
    def key(self) -> str:
        return scene_key(self.dataset, self.split, self.scene_id)


# ----------------------------------------------------------------------------- image headers

_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
PNG_MODES = {0: 'L', 2: 'RGB', 3: 'P', 4: 'LA', 6: 'RGBA'}


def png_info(data: bytes, where: str, crc: bool = True) -> tuple[int, int, str, int]:
    """(width, height, mode, bit depth) of a PNG after checking its structure without decoding.

    Walks the chunk chain to IEND and (``crc``) verifies every chunk's CRC: catches truncated,
    garbage and bit-flipped files at a fraction of a decode's cost. Without ``crc`` (for bytes a
    source checksum already covers) only the structure is checked. Raises SourceError naming
    ``where``.
    """
    if data[:8] != _PNG_SIGNATURE:
        raise SourceError(f'{where}: not a PNG (bad signature)')
    pos, n = 8, len(data)
    info = None
    while True:
        if pos + 8 > n:
            raise SourceError(f'{where}: undecodable PNG (truncated before IEND)')
        length, kind = struct.unpack_from('>I4s', data, pos)
        end = pos + 8 + length + 4
        if end > n:
            raise SourceError(f'{where}: undecodable PNG (truncated {kind!r} chunk)')
        if crc and zlib.crc32(memoryview(data)[pos + 4:end - 4]) != \
                struct.unpack_from('>I', data, end - 4)[0]:
            raise SourceError(f'{where}: undecodable PNG (CRC mismatch in {kind!r} chunk)')
        if kind == b'IHDR':
            width, height, depth, color = struct.unpack_from('>IIBB', data, pos + 8)
            if color not in PNG_MODES:
                raise SourceError(f'{where}: undecodable PNG (colour type {color})')
            info = (width, height, PNG_MODES[color], depth)
        elif kind == b'IEND':
            break
        pos = end
    if info is None:
        raise SourceError(f'{where}: undecodable PNG (no IHDR chunk)')
    return info


_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers
JPEG_MODES = {1: 'L', 3: 'RGB', 4: 'CMYK'}


def jpeg_info(data: bytes, where: str) -> tuple[int, int, str, int]:
    """(width, height, mode, bit depth) of a JPEG from its frame header, without decoding.

    Walks the marker segments from SOI to the first scan (SOS), checking each segment's length, and
    requires an end-of-image marker after the scan (a truncated file has none: FF D9 cannot occur
    inside entropy-coded data). Raises SourceError naming ``where``.
    """
    if data[:3] != b'\xff\xd8\xff':
        raise SourceError(f'{where}: not a JPEG (bad signature)')
    pos, n, info = 2, len(data), None
    while True:
        if pos + 4 > n:
            raise SourceError(f'{where}: undecodable JPEG (truncated before the image data)')
        if data[pos] != 0xFF:
            raise SourceError(f'{where}: undecodable JPEG (no marker at byte {pos})')
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # segments without a length
            pos += 2
            continue
        if marker == 0xD9:
            raise SourceError(f'{where}: undecodable JPEG (end of image before any scan)')
        length = struct.unpack_from('>H', data, pos + 2)[0]
        if length < 2 or pos + 2 + length > n:
            raise SourceError(f'{where}: undecodable JPEG (truncated segment 0x{marker:02X})')
        if marker in _JPEG_SOF:
            if length < 8:
                raise SourceError(f'{where}: undecodable JPEG (short frame header)')
            depth, height, width, comps = struct.unpack_from('>BHHB', data, pos + 4)
            if comps not in JPEG_MODES or height == 0 or width == 0:
                raise SourceError(f'{where}: unsupported JPEG ({comps} components, '
                                  f'{width}x{height})')
            info = (width, height, JPEG_MODES[comps], depth)
        elif marker == 0xDA:  # start of scan: the header is over
            break
        pos += 2 + length
    if info is None:
        raise SourceError(f'{where}: undecodable JPEG (no frame header before the scan)')
    if data.rfind(b'\xff\xd9', pos) < 0:
        raise SourceError(f'{where}: undecodable JPEG (truncated: no end-of-image marker)')
    return info


def image_format(data: bytes) -> str | None:
    """'png' or 'jpeg' from the leading bytes, None for anything else."""
    if data[:8] == _PNG_SIGNATURE:
        return 'png'
    return 'jpeg' if data[:3] == b'\xff\xd8\xff' else None


def image_info(data: bytes, where: str, crc: bool = True) -> tuple[int, int, str, str]:
    """(width, height, mode, format) of PNG or JPEG bytes from their headers, without decoding
    (``png_info`` / ``jpeg_info``: structure checked; ``crc`` for PNG). SourceError naming ``where``
    for anything else."""
    fmt = image_format(data)
    if fmt == 'png':
        return (*png_info(data, where, crc)[:3], fmt)
    if fmt == 'jpeg':
        return (*jpeg_info(data, where)[:3], fmt)
    raise SourceError(f'{where}: neither a PNG nor a JPEG (unknown signature {bytes(data[:4])!r})')


# ----------------------------------------------------------------------------- encoding

def _provenance(scene: SourceScene) -> dict[str, Any]:
    """The meta.json keys a reader states about its source: the scene's values, else (for the
    datasets of DATASETS) the table's."""
    d = DATASETS.get(scene.dataset, {})
    out = {}
    for name in ('near', 'far', 'near_far_source', 'source_format', 'source_camera_convention',
                 'camera_conversion', 'world_frame', 'canonical_frame'):
        value = getattr(scene, name)
        out[name] = value if value is not None else d.get(name)
    out['canonical_frame'] = out['canonical_frame'] or DEFAULT_CANONICAL_FRAME
    # SRT's sets are z up (NMR after the reference's rotation); others state theirs or nothing.
    out['up_axis'] = scene.up_axis if scene.up_axis is not None else \
        ([0.0, 0.0, 1.0] if scene.dataset in DATASETS else None)
    return out


def scene_meta(scene: SourceScene, sizes: list[tuple[int, int]], image_mode: str,
               fmt: str = 'png') -> dict[str, Any]:
    """The ``meta.json`` of a scene: everything a consumer needs besides cameras and pixels.
    ``sizes``: (height, width) per view; ``height``/``width`` are null unless the views share one."""
    shared = len(set(sizes)) == 1
    return {
        'schema_version': SCHEMA_VERSION,
        'dataset': scene.dataset,
        'split': scene.split,
        'key': scene.key,
        'scene_id': scene.scene_id,
        'reference_index': scene.reference_index,
        'views': list(scene.view_names),
        'num_views': len(scene.images),
        'height': sizes[0][0] if shared else None,
        'width': sizes[0][1] if shared else None,
        'image_sizes': [list(s) for s in sizes],
        'image_mode': image_mode,
        'image_format': fmt,
        'pose_convention': POSE_CONVENTION,
        'pixel_center': 0.5,
        'timestamps': None if scene.timestamps is None else [int(t) for t in scene.timestamps],
        'distortion': scene.distortion,
        'extras': sorted(scene.extras),
        'extras_info': scene.extras_info,
        'source': scene.source_meta,
        **_provenance(scene),
    }


def encode_scene(scene: SourceScene, bake_rays: bool = False) -> tuple[str, list[tuple[str, bytes]]]:
    """Validate a source scene and return (key, [(member name, bytes)]) in the fixed member order.

    Raises SourceError naming ``scene.origin``, the scene and the view for: no views, counts that
    differ from the views' (cameras, timestamps, extras), non-finite or invalid cameras, image bytes
    that are not a whole PNG or JPEG, views of another format than the first's, an extra whose size
    differs from its view's. Views may differ in size (``image_sizes``), except in the datasets of
    DATASETS; ``bake_rays`` stores rays only for a scene whose views share one size.
    """
    where = f'{scene.origin}: scene {scene.scene_id}'
    V = len(scene.images)
    if V == 0:
        raise SourceError(f'{where}: no views')
    if len(scene.view_names) != V:
        raise SourceError(f'{where}: {len(scene.view_names)} view names for {V} images')
    try:
        K = cameras.check_intrinsics(scene.K)
        c2w = cameras.check_pose(scene.c2w, 'camera pose')
    except ValueError as e:
        raise SourceError(f'{where}: bad camera: {e}') from None
    if K.shape != (V, 3, 3) or c2w.shape != (V, 4, 4):
        raise SourceError(f'{where}: {V} images but cameras K {K.shape}, c2w {c2w.shape}')
    if scene.timestamps is not None and len(scene.timestamps) != V:
        raise SourceError(f'{where}: {len(scene.timestamps)} timestamps for {V} views')
    crc = not scene.checksummed
    infos = [image_info(img, f'{where} view {name}', crc)
             for name, img in zip(scene.view_names, scene.images)]
    fmt, mode = infos[0][3], infos[0][2]
    for name, (_, _, _, f) in zip(scene.view_names, infos):
        if f != fmt:
            raise SourceError(f'{where} view {name}: a {f.upper()} image in a scene whose first '
                              f'view is a {fmt.upper()} (one image format per scene)')
    sizes = [(h, w) for w, h, _, _ in infos]
    if scene.dataset in DATASETS:  # SRT's sets: their reference loaders stack the views
        for name, (h, w) in zip(scene.view_names, sizes):
            if (h, w) != sizes[0]:
                raise SourceError(f'{where} view {name}: wrong image size {w}x{h}, expected '
                                  f'{sizes[0][1]}x{sizes[0][0]} like view {scene.view_names[0]}')
    members = [(META, json_bytes(scene_meta(scene, sizes, mode, fmt))),
               (CAMERAS, npz_bytes({'K': K, 'c2w': c2w}))]
    members += [(rgb_member(v, IMAGE_EXTS[fmt]), img) for v, img in enumerate(scene.images)]
    for kind in sorted(scene.extras):
        values = scene.extras[kind]
        ext = scene.extras_ext.get(kind, 'png')
        if len(values) != V:
            raise SourceError(f'{where}: {len(values)} {kind} images for {V} views')
        for v, data in enumerate(values):
            if ext in ('png', 'jpg'):
                view = f'{where} view {scene.view_names[v]} {kind}'
                w, h, _, f = image_info(data, view, crc)
                if (h, w) != sizes[v] or IMAGE_EXTS[f] != ext:
                    raise SourceError(f'{view}: a {w}x{h} {f.upper()} for a {ext} member of a '
                                      f'{sizes[v][1]}x{sizes[v][0]} view')
            members.append((extra_member(kind, v, ext), data))
    if bake_rays and len(set(sizes)) == 1:
        import zstandard
        _, dirs = cameras.image_rays(K, c2w, *sizes[0])
        members.append((RAYS, zstandard.ZstdCompressor(level=3).compress(
            npy_bytes(dirs.astype(np.float32)))))
    return scene.key, [(f'{scene.key}.{name}', data) for name, data in members]
