"""The shard schema: the single table of member names, encodings and scene metadata (docs/SHARDS.md).

One WebDataset sample per scene; its key is ``<dataset>_<split>_<scene id>`` with every character
outside [A-Za-z0-9_-] replaced by '-' (WebDataset splits member names at the first dot). Members:

===================  ==========================================================================
``meta.json``        scene metadata (see ``scene_meta``), UTF-8 JSON with sorted keys
``cameras.npz``      ``K`` [V, 3, 3] float64 (pixels, pixel centres at +0.5) and ``c2w`` [V, 4, 4]
                     float64 (world_from_cam, OpenCV axes), raw world units; an uncompressed npz
                     readable with ``numpy.load(..., allow_pickle=False)``
``rgb_<vvv>.png``    view ``vvv`` (000, 001, ...), the source's PNG bytes unchanged (RGB or RGBA)
``<kind>_<vvv>.png`` per-view extras the source has (``category``, ``instance``, ``depth``), PNG bytes
                     unchanged; extras that are arrays in the source are ``<kind>_<vvv>.npy``
``rays.npy.zst``     only with ``--bake-rays``: ray directions [V, H, W, 3] float32, zstd-compressed
                     npy (origins are ``c2w[:, :3, 3]``)
===================  ==========================================================================

Every sample of a split has the same member names. Bumping ``SCHEMA_VERSION`` is required for any
change a reader could notice.
"""
from __future__ import annotations

import dataclasses
import io
import json
import re
import struct
import zipfile
import zlib
from typing import Any

import numpy as np

from pipeline import cameras

SCHEMA_VERSION = 1
POSE_CONVENTION = 'c2w_opencv'
META = 'meta.json'
CAMERAS = 'cameras.npz'
RAYS = 'rays.npy.zst'
RGB_PREFIX = 'rgb'
# Not a shard member: the file by which the converter's dataset card recognises a source directory
# written by ``pipeline.synthetic`` (which writes it).
SYNTHETIC_MARKER = 'srt_shards_synthetic.json'

# Per dataset: the reference loader's render range (near/far, used by the volumetric decoder) and
# canonical-frame rule; the reference's ``render_kwargs`` of each dataset class are the source.
DATASETS: dict[str, dict[str, Any]] = {
    'nmr': dict(near=2.0, far=4.0, canonical_frame='input_view_pose',
                near_far_source='stelzner/srt srt/data/nmr.py NMRDataset.render_kwargs'),
    'clevr3d': dict(near=0.035, far=35.0, canonical_frame='look_at_origin',
                    near_far_source='stelzner/srt srt/data/obsurf.py Clevr3dDataset.render_kwargs'),
    'obsurf_msn': dict(near=0.035, far=35.0, canonical_frame='look_at_origin',
                       near_far_source='stelzner/srt srt/data/obsurf.py Clevr3dDataset.render_kwargs'),
    'msn': dict(near=0.0, far=20.0, canonical_frame='center_columns_rays',
                near_far_source='stelzner/srt srt/data/multishapenet.py '
                                'MultishapenetDataset.render_kwargs'),
    'msn_hard': dict(near=0.0, far=20.0, canonical_frame='center_columns_rays',
                     near_far_source='stelzner/osrt osrt/data/multishapenet.py '
                                     'MultishapenetDataset.render_kwargs'),
}

_KEY_UNSAFE = re.compile(r'[^A-Za-z0-9_-]')


class SourceError(ValueError):
    """Bad source data; the message names the file and the scene."""


def rgb_member(view: int) -> str:
    return f'{RGB_PREFIX}_{view:03d}.png'


def extra_member(kind: str, view: int, ext: str) -> str:
    return f'{kind}_{view:03d}.{ext}'


_RGB_MEMBER = re.compile(rf'{RGB_PREFIX}_(\d{{3,}})\.png')


def rgb_view(member: str) -> int | None:
    """The view index of an RGB member name, None for any other member.

    >>> rgb_view('rgb_012.png'), rgb_view('category_012.png'), rgb_view('meta.json')
    (12, None, None)
    """
    m = _RGB_MEMBER.fullmatch(member)
    return int(m.group(1)) if m else None


def scene_key(dataset: str, split: str, scene_id) -> str:
    """Stable unique sample key without dots, e.g. ``nmr_train_02958343-scene00007``."""
    return _KEY_UNSAFE.sub('-', f'{dataset}_{split}_{scene_id}')


@dataclasses.dataclass
class SourceScene:
    """One scene as a source reader yields it, before encoding into a shard sample."""
    dataset: str  # 'nmr' | 'clevr3d' | 'obsurf_msn' | 'msn' | 'msn_hard'
    split: str
    scene_id: Any  # the source's scene id, verbatim (str or int)
    reference_index: int  # position of the scene in the reference loader's order for this split
    view_names: list[str]  # the source's name of each view, in stored order
    images: list[bytes]  # PNG bytes per view, unchanged from the source
    K: np.ndarray  # [V, 3, 3] pixels
    c2w: np.ndarray  # [V, 4, 4] world_from_cam, OpenCV axes
    extras: dict[str, list[bytes]] = dataclasses.field(default_factory=dict)  # kind -> per view
    extras_ext: dict[str, str] = dataclasses.field(default_factory=dict)  # kind -> 'png' | 'npy'
    source_meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # JSON-able extras
    origin: str = ''  # source file(s) for error messages
    checksummed: bool = False  # the source verified a checksum over these bytes (TFRecord CRC32C)

    @property
    def key(self) -> str:
        return scene_key(self.dataset, self.split, self.scene_id)


# ----------------------------------------------------------------------------- PNG header checks

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


# ----------------------------------------------------------------------------- encoding

def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Deterministic uncompressed npz (fixed zip timestamps; ``numpy.savez`` stamps the clock).

    Written directly (the zip format with stored members), which is ~10x faster than zipfile;
    ``numpy.load(..., allow_pickle=False)`` and any zip reader open it.
    """
    local, central, offset = [], [], 0
    for name in sorted(arrays):
        data = npy_bytes(arrays[name])
        fname = f'{name}.npy'.encode()
        crc = zlib.crc32(data)
        # local file header: version 20, no flags, stored, DOS time 0 / date 1980-01-01
        head = struct.pack('<IHHHHHIIIHH', 0x04034B50, 20, 0, 0, 0, 0x21, crc, len(data), len(data),
                           len(fname), 0) + fname
        central.append(struct.pack('<IHHHHHHIIIHHHHHII', 0x02014B50, 20, 20, 0, 0, 0, 0x21, crc,
                                   len(data), len(data), len(fname), 0, 0, 0, 0, 0o600 << 16,
                                   offset) + fname)
        local += [head, data]
        offset += len(head) + len(data)
    directory = b''.join(central)
    end = struct.pack('<IHHHHIIH', 0x06054B50, 0, 0, len(central), len(central), len(directory),
                      offset, 0)
    return b''.join(local) + directory + end


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def json_bytes(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(',', ':'), ensure_ascii=False).encode()


def scene_meta(scene: SourceScene, height: int, width: int, image_mode: str) -> dict[str, Any]:
    """The ``meta.json`` of a scene: everything a consumer needs besides cameras and pixels."""
    d = DATASETS[scene.dataset]
    return {
        'schema_version': SCHEMA_VERSION,
        'dataset': scene.dataset,
        'split': scene.split,
        'key': scene.key,
        'scene_id': scene.scene_id,
        'reference_index': scene.reference_index,
        'views': list(scene.view_names),
        'num_views': len(scene.images),
        'height': height,
        'width': width,
        'image_mode': image_mode,
        'pose_convention': POSE_CONVENTION,
        'pixel_center': 0.5,
        'up_axis': [0.0, 0.0, 1.0],
        'near': d['near'],
        'far': d['far'],
        'near_far_source': d['near_far_source'],
        'canonical_frame': d['canonical_frame'],
        'extras': sorted(scene.extras),
        'source': scene.source_meta,
    }


def encode_scene(scene: SourceScene, bake_rays: bool = False) -> tuple[str, list[tuple[str, bytes]]]:
    """Validate a source scene and return (key, [(member name, bytes)]) in the fixed member order.

    Raises SourceError naming ``scene.origin`` and the scene for: no views, image count mismatch,
    non-finite or invalid cameras, undecodable PNGs, images of differing sizes.
    """
    where = f'{scene.origin}: scene {scene.scene_id}'
    V = len(scene.images)
    if V == 0:
        raise SourceError(f'{where}: no views')
    try:
        K = cameras.check_intrinsics(scene.K)
        c2w = cameras.check_pose(scene.c2w, 'camera pose')
    except ValueError as e:
        raise SourceError(f'{where}: bad camera: {e}') from None
    if K.shape != (V, 3, 3) or c2w.shape != (V, 4, 4):
        raise SourceError(f'{where}: {V} images but cameras K {K.shape}, c2w {c2w.shape}')
    crc = not scene.checksummed
    width, height, mode, _ = png_info(scene.images[0], f'{where} view {scene.view_names[0]}', crc)
    for name, img in zip(scene.view_names, scene.images):
        w, h, m, _ = png_info(img, f'{where} view {name}', crc)
        if (w, h) != (width, height):
            raise SourceError(f'{where} view {name}: wrong image size {w}x{h}, '
                              f'expected {width}x{height} like view {scene.view_names[0]}')
    members = [(META, json_bytes(scene_meta(scene, height, width, mode))),
               (CAMERAS, npz_bytes({'K': K, 'c2w': c2w}))]
    members += [(rgb_member(v), img) for v, img in enumerate(scene.images)]
    for kind in sorted(scene.extras):
        values = scene.extras[kind]
        ext = scene.extras_ext.get(kind, 'png')
        if len(values) != V:
            raise SourceError(f'{where}: {len(values)} {kind} images for {V} views')
        for v, data in enumerate(values):
            if ext == 'png':
                png_info(data, f'{where} view {scene.view_names[v]} {kind}', crc)
            members.append((extra_member(kind, v, ext), data))
    if bake_rays:
        import zstandard
        _, dirs = cameras.image_rays(K, c2w, height, width)
        members.append((RAYS, zstandard.ZstdCompressor(level=3).compress(
            npy_bytes(dirs.astype(np.float32)))))
    return scene.key, [(f'{scene.key}.{name}', data) for name, data in members]
