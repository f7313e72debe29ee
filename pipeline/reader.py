"""THE parser of shard samples: a split's shards (from its manifest), the samples of one shard, and
``Scene``, one sample parsed, validated and decoded lazily. Nothing else reads a sample's members.

A sample is the dict WebDataset builds from one scene's members: ``{'__key__': ..., '__url__': ...,
<member name>: bytes, ...}`` with the member names of ``pipeline.schema``. ``Scene(sample)`` parses
the metadata and the cameras at once and checks them (the camera member's stored CRC-32, finite and
rigid poses, valid intrinsics); each view's pixels are decoded on first use. Every problem is a
``ShardError`` naming the shard URL, the sample key and, where one is concerned, the view.

    for sample in iter_shard(url):
        scene = Scene(sample)   # scene.K [V, 3, 3], scene.c2w [V, 4, 4], scene.image(0) [h, w, 3]
"""
from __future__ import annotations

import io
import json
import math
import os
import zlib
from typing import Any, BinaryIO, Iterator, Sequence

import numpy as np

from pipeline import cameras, tario
from pipeline.decode import decode_image
from pipeline.fetch import open_shard
from pipeline.schema import (CAMERAS, IMAGE_EXTS, META, READABLE_SCHEMA_VERSIONS, extra_member,
                             rgb_member)


class ShardError(ValueError):
    """Unreadable or inconsistent shard data; the message names the shard and sample."""


# ----------------------------------------------------------------------------- a split's shards

def read_manifest(directory: str, split: str) -> dict[str, Any]:
    path = os.path.join(directory, f'{split}.manifest.json')
    if not os.path.isfile(path):
        if not os.path.isdir(directory):
            raise FileNotFoundError(f'{directory}: no such shard directory')
        have = sorted(f[:-len('.manifest.json')] for f in os.listdir(directory)
                      if f.endswith('.manifest.json'))
        raise FileNotFoundError(f'{path}: no manifest for split {split!r} (splits here: {have or "none"};'
                                ' convert the dataset first, see tools/convert_*.py)')
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get('schema_version') not in READABLE_SCHEMA_VERSIONS:
        raise ShardError(f'{path}: schema version {manifest.get("schema_version")} is not a '
                         f'supported version {READABLE_SCHEMA_VERSIONS}; reconvert with this version')
    return manifest


def shard_table(directory: str, split: str, url_template: str | None = None
                ) -> list[tuple[str, int]]:
    """[(shard URL, scenes)] of a converted split, in manifest order.

    ``url_template`` streams the shards from elsewhere, e.g. object storage, with ``{name}`` for the
    shard's file name: ``'pipe:aws s3 cp s3://bucket/msn/{name} -'`` (only the manifests need to be
    in ``directory``).
    """
    if url_template is not None and '{name}' not in url_template:
        raise ValueError(f'shard URL template {url_template!r} has no {{name}}')
    manifest = read_manifest(directory, split)
    return [(url_template.format(name=s['name']) if url_template else
             os.path.join(directory, s['name']), s['scenes']) for s in manifest['shards']]


def shard_urls(directory: str, split: str, url_template: str | None = None) -> list[str]:
    """URLs of the split's shards, in manifest order (``url_template`` as in ``shard_table``)."""
    return [url for url, _ in shard_table(directory, split, url_template)]


def render_range(directory: str, split: str = 'train', url_template: str | None = None
                 ) -> tuple[float, float]:
    """(near, far) render range of a converted split, in world units: the manifest's ``near`` /
    ``far`` when it has them, else those of the split's first scene (its ``meta.json``).
    ShardError when the source states none (the importers' formats: pass the range yourself)."""
    manifest = read_manifest(directory, split)
    if manifest.get('near') is not None and manifest.get('far') is not None:
        return float(manifest['near']), float(manifest['far'])
    for url in shard_urls(directory, split, url_template):
        samples = iter_shard(url)
        try:
            sample = next(samples, None)
        finally:
            samples.close()
        if sample is not None:
            meta = Scene(sample).meta
            if meta.get('near') is None or meta.get('far') is None:
                raise ShardError(f'{url}: sample {sample["__key__"]}: {META} states no near/far '
                                 f'render range (its source has none: dataset {meta.get("dataset")})')
            return float(meta['near']), float(meta['far'])
    raise ShardError(f'{directory}: split {split!r} has no scenes to read near/far from')


# ----------------------------------------------------------------------------- samples of a shard

def open_url(url: str) -> BinaryIO:
    """A binary stream for a local path, ``pipe:`` command, http(s) URL or object-store URL, read
    with retries (``pipeline.fetch``; streams pass the manifest entry to verify its sha256)."""
    return open_shard(url)


def iter_shard(url: str, stream: BinaryIO | None = None, defer: int | None = None
               ) -> Iterator[dict[str, Any]]:
    """The samples of one shard, as WebDataset-style dicts of member bytes (fast tar parsing).
    A truncated or corrupt tar raises ``tario.TarFormatError`` naming the URL. ``stream``: the
    shard already opened (``pipeline.fetch.ShardFetcher.open``), closed at the end. ``defer``: in
    a shard that is a regular file, members of at least this many bytes are ``tario.FileMember``s,
    read when ``Scene`` first needs them (while this iterator is open; the training stream's
    way to skip the views its items do not use), and the shard's member index (``<shard>.idx``,
    written by the converter) is used where it is current, so the other headers are not read."""
    stream = open_url(url) if stream is None else stream
    try:
        index = tario.sidecar_index(url, stream) if defer is not None else None
        if index is not None:
            for key, members in tario.iter_indexed_samples(stream, index, url, defer):
                yield {'__key__': key, '__url__': url, **members}
            return
        sample: dict[str, Any] = {}
        for name, data, _ in tario.iter_members(stream, url, defer=defer):
            key, member = tario.split_key(name)
            if sample and sample['__key__'] != key:
                yield sample
                sample = {}
            if not sample:
                sample = {'__key__': key, '__url__': url}
            sample[member] = data
        if sample:
            yield sample
    finally:
        stream.close()


# ----------------------------------------------------------------------------- cameras

def _stored_npy(data: bytes, pos: int, shape: tuple[int, ...], where: str
                ) -> tuple[np.ndarray, int] | None:
    """The float64 array of a stored (uncompressed) zip entry at ``pos`` holding an .npy of the
    expected shape, and the offset after it, once the entry's CRC-32 is checked; None if the bytes
    are not laid out as the converter writes them (the caller then falls back to numpy.load)."""
    if data[pos:pos + 4] != b'PK\x03\x04' or data[pos + 6:pos + 10] != b'\x00\x00\x00\x00':
        return None  # not a local header, or flags (data descriptor: no CRC here) or compression
    size = int.from_bytes(data[pos + 18:pos + 22], 'little')
    start = pos + 30 + int.from_bytes(data[pos + 26:pos + 28], 'little') + \
        int.from_bytes(data[pos + 28:pos + 30], 'little')
    if data[start:start + 8] != b'\x93NUMPY\x01\x00':
        return None
    hlen = int.from_bytes(data[start + 8:start + 10], 'little')
    header = data[start + 10:start + 10 + hlen]
    want = ', '.join(str(d) for d in shape)
    if b"'descr': '<f8'" not in header or b"'fortran_order': False" not in header or \
            f"'shape': ({want})".encode() not in header:
        return None
    body = start + 10 + hlen
    n = math.prod(shape) * 8
    if body + n != start + size or start + size > len(data):
        return None
    if zlib.crc32(memoryview(data)[start:start + size]) != int.from_bytes(data[pos + 14:pos + 18],
                                                                          'little'):
        raise ShardError(f'{where}: corrupt {CAMERAS} (CRC-32 mismatch in a stored array)')
    return np.frombuffer(data, np.float64, n // 8, body).reshape(shape), start + size


def load_cameras(data: bytes, where: str, num_views: int) -> tuple[np.ndarray, np.ndarray]:
    """(K [V,3,3], c2w [V,4,4]) float64 from ``cameras.npz`` bytes, checked: the zip entries'
    CRC-32, the shapes, finite values, rigid poses (orthonormal, det +1) and valid intrinsics. The
    converter's layout is parsed directly (~30x faster than numpy.load's zipfile path, which is the
    fallback). Raises ShardError naming ``where`` and, for a bad camera, the view."""
    K = _stored_npy(data, 0, (num_views, 3, 3), where)
    c2w = _stored_npy(data, K[1], (num_views, 4, 4), where) if K is not None else None
    if c2w is not None:
        K, c2w = K[0], c2w[0]
    else:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                K, c2w = npz['K'], npz['c2w']
        except Exception as e:  # not a zip, bad CRC-32, missing array
            raise ShardError(f'{where}: unreadable {CAMERAS} ({type(e).__name__}: {e})') from None
    if K.shape != (num_views, 3, 3) or c2w.shape != (num_views, 4, 4):
        raise ShardError(f'{where}: {CAMERAS} holds K {list(K.shape)} and c2w {list(c2w.shape)} '
                         f'for {num_views} views')
    if not _plainly_valid(K, c2w):
        for v in range(num_views):  # the full checks, to name the first bad view and the fault
            try:
                cameras.check_intrinsics(K[v])
                cameras.check_pose(c2w[v], 'c2w')
            except ValueError as e:
                raise ShardError(f'{where} view {v}: bad camera in {CAMERAS}: {e}') from None
    return K, c2w


_K_ROW, _POSE_ROW, _EYE3 = np.array([0.0, 0.0, 1.0]), np.array([0.0, 0.0, 0.0, 1.0]), np.eye(3)


def _plainly_valid(K: np.ndarray, c2w: np.ndarray) -> bool:
    """True if every camera passes ``cameras.check_intrinsics`` / ``check_pose`` with exact last
    rows, as the converter writes them: one vectorised pass, ~5x cheaper than those checks (it runs
    once per scene on the loader's hot path); False sends the caller to the per-view checks."""
    if not math.isfinite(K.sum() + c2w.sum()):  # a nan or inf somewhere
        return False
    if (K[:, 2] != _K_ROW).any() or (c2w[:, 3] != _POSE_ROW).any():
        return False
    R = c2w[:, :3, :3]
    if np.abs(R.transpose(0, 2, 1) @ R - _EYE3).max() > 1e-4 or (np.linalg.det(R) <= 0).any():
        return False  # not orthonormal, or a reflection
    return bool((np.abs(K[:, 0, 0] * K[:, 1, 1] - K[:, 0, 1] * K[:, 1, 0]) >= 1e-12).all())


# ----------------------------------------------------------------------------- one scene

_STACK_MAX_PIXELS = 2**17  # views of fewer pixels are decoded into one [V, h, w, c] array


class Scene:
    """One shard sample (schema 1 or 2): metadata and cameras parsed and checked at once, each
    view's pixels decoded on first use and kept (all the items of a scene share them).

    ``key``, ``url``, ``meta`` (the ``meta.json`` dict), ``num_views``, ``image_format`` ('png' |
    'jpeg'), ``image_size(view)`` -> (h, w), ``timestamps`` (list or None); ``height``/``width``
    when the views share one size (else they raise ShardError: use ``image_size``); ``K`` [V, 3, 3]
    float64 intrinsics in pixels (pixel centres at +0.5) and ``c2w`` [V, 4, 4] float64
    world_from_cam with OpenCV axes (both read-only).
    """

    def __init__(self, sample: dict[str, Any]):
        self.sample = sample
        self.key: str = sample.get('__key__', '?')
        self.url: str = sample.get('__url__', '')
        self.where = f'{self.url or "?"}: sample {self.key}'
        if META not in sample:
            raise ShardError(f'{self.where}: no {META} member')
        try:
            meta = json.loads(self._read(META))
            num_views = int(meta['num_views'])
            if meta.get('height') is not None and meta.get('width') is not None:  # one size
                sizes = [(int(meta['height']), int(meta['width']))] * num_views
            else:
                sizes = [(int(h), int(w)) for h, w in meta['image_sizes']]
            fmt = meta.get('image_format', 'png')  # schema 1: PNG
            ext = IMAGE_EXTS[fmt]
        except Exception as e:  # bad JSON, a missing field
            raise ShardError(f'{self.where}: unreadable {META} ({type(e).__name__}: {e})') from None
        if len(sizes) != num_views:
            raise ShardError(f'{self.where}: {META} has {len(sizes)} image_sizes for {num_views} '
                             'views')
        if CAMERAS not in sample:
            raise ShardError(f'{self.where}: no {CAMERAS} member')
        self.K, self.c2w = load_cameras(self._read(CAMERAS), self.where, num_views)
        self.meta: dict[str, Any] = meta
        self.num_views, self.image_format, self._ext = num_views, fmt, ext
        self._sizes = sizes
        self._uniform = len(set(sizes)) == 1
        # Decoded small views of one size live in one [V, h, w, c] array, so that sampled pixels of
        # many views are one gather (a loop over views cost 10x more than the decoding, for NMR);
        # large views (RE10K's 360x640: the copy into that array cost 10% of a JPEG decode) and
        # views of differing sizes are kept per view, as decoded.
        self._stacked = self._uniform and sizes[0][0] * sizes[0][1] < _STACK_MAX_PIXELS
        self._pixels: np.ndarray | dict[int, np.ndarray] | None = None
        self._decoded = [False] * num_views
        self._extras: dict[tuple[str, int], np.ndarray] = {}

    def _read(self, name: str, view: int | None = None) -> bytes | None:
        """Member ``name``'s bytes (None if the sample has none), read from the shard file where
        the reader left them there (``iter_shard(defer=...)``)."""
        data = self.sample.get(name)
        if isinstance(data, tario.FileMember):
            try:
                data = data.read()
            except tario.TarFormatError as e:
                raise ShardError(f'{self.where}{"" if view is None else f" view {view}"}: {e}') \
                    from None
        return data

    def __repr__(self) -> str:
        size = f'{self._sizes[0][0]}x{self._sizes[0][1]}' if self._uniform else 'several sizes'
        return f'Scene({self.key!r}, {self.num_views} views of {size})'

    @property
    def height(self) -> int:
        return self._shared_size()[0]

    @property
    def width(self) -> int:
        return self._shared_size()[1]

    def _shared_size(self) -> tuple[int, int]:
        if not self._uniform:
            raise ShardError(f'{self.where}: its views differ in size '
                             f'({sorted(set(self._sizes))}); use image_size(view)')
        return self._sizes[0]

    def image_size(self, view: int) -> tuple[int, int]:
        """(height, width) of ``view`` in pixels."""
        return self._sizes[view]

    @property
    def timestamps(self) -> list[int] | None:
        """The source's per-view timestamps (e.g. RE10K microseconds), or None."""
        return self.meta.get('timestamps')

    def image_bytes(self, view: int) -> bytes:
        """The stored, encoded bytes of ``view`` (PNG or JPEG: ``image_format``), undecoded."""
        name = rgb_member(view, self._ext)
        if not 0 <= view < self.num_views or name not in self.sample:
            raise ShardError(f'{self.where} view {view}: no {name} member')
        return self._read(name, view)

    def image(self, view: int) -> np.ndarray:
        """[h, w, 3] uint8 RGB of ``view`` (alpha dropped, as the reference loaders do; a view into
        the scene's pixels, not a copy)."""
        if not 0 <= view < self.num_views:
            raise IndexError(f'{self.where}: no view {view} (it has {self.num_views})')
        if not self._decoded[view]:
            self._decode(view)
        return self._pixels[view][..., :3]

    def images(self, views: Sequence[int] | None = None) -> np.ndarray:
        """[n, h, w, 3] uint8 RGB of ``views`` (every view by default), a new array; ShardError if
        they differ in size."""
        views = [int(v) for v in (range(self.num_views) if views is None else views)]
        self._same_size(views)
        out = [self.image(v) for v in views]
        return np.stack(out) if out else np.empty((0, *self._sizes[0], 3), np.uint8)

    def _same_size(self, views: Sequence[int]) -> tuple[int, int]:
        sizes = {self._sizes[v] for v in views}
        if len(sizes) > 1:
            raise ShardError(f'{self.where}: views {list(views)} differ in size ({sorted(sizes)})')
        return sizes.pop() if sizes else self._sizes[0]

    def gather(self, views: Sequence[int], flat: np.ndarray, keep: bool = True) -> np.ndarray:
        """Pixels [p, 3] uint8 at ``flat`` indices into the concatenated row-major pixels of
        ``views`` (index = position in ``views`` * h * w + row * w + column); the views must
        share one size. Sorted indices (the generic items') are gathered a view at a time, and
        with ``keep`` False each view's decoded pixels are let go once taken (a scene read for one
        item: the next view's decode then reuses memory still in the CPU's cache)."""
        h, w = self._same_size(views)
        if self._stacked:
            for v in views:
                self.image(v)
            view_of, rem = np.divmod(flat, h * w)
            index = np.asarray(views, np.int64)[view_of] * (h * w) + rem
            c = self._pixels.shape[-1]
            return np.ascontiguousarray(np.take(self._pixels.reshape(-1, c), index, axis=0)[:, :3])
        # A view at a time, each view's pixels taken while it is in the cache: indices sorted
        # (the generic items draw them so), else sorted here and the pixels put back in order.
        order = None if len(flat) < 2 or (flat[1:] >= flat[:-1]).all() else np.argsort(flat)
        ordered = flat if order is None else flat[order]
        cuts = np.searchsorted(ordered, np.arange(len(views) + 1) * (h * w)).tolist()
        out = np.empty((len(flat), 3), np.uint8)
        for i, v in enumerate(views):
            self.image(v)
            img = self._pixels[int(v)]
            part, index = out[cuts[i]:cuts[i + 1]], ordered[cuts[i]:cuts[i + 1]] - i * h * w
            if img.shape[-1] == 3:
                np.take(img.reshape(-1, 3), index, axis=0, out=part)
            else:
                part[:] = np.take(img.reshape(-1, img.shape[-1]), index, axis=0)[:, :3]
            if not keep and v not in views[i + 1:]:
                del self._pixels[int(v)]
                self._decoded[int(v)] = False
        if order is not None:
            out[order] = out.copy()
        return out

    def extra(self, kind: str, view: int) -> np.ndarray:
        """The ``kind`` extra of ``view`` (e.g. 'category'): an image's own channels [h, w, c] or
        the stored npy array [h, w, ...]."""
        if (kind, view) not in self._extras:
            data = None
            for ext in ('png', 'jpg', 'npy'):
                data = self._read(extra_member(kind, view, ext), view)
                if data is not None:
                    break
            if data is None:
                raise ShardError(f'{self.where} view {view}: no {kind} member')
            try:
                arr = np.load(io.BytesIO(data), allow_pickle=False) if ext == 'npy' else \
                    decode_image(data)
            except Exception as e:
                raise ShardError(f'{self.where} view {view}: undecodable {kind} '
                                 f'({type(e).__name__}: {e})') from None
            if arr.shape[:2] != self._sizes[view]:
                raise ShardError(f'{self.where} view {view}: {kind} size {list(arr.shape[:2])} '
                                 f'!= image size {list(self._sizes[view])}')
            self._extras[kind, view] = arr
        return self._extras[kind, view]

    def decode(self, views: Sequence[int] | None = None, extras: Sequence[str] = ()) -> 'Scene':
        """Decode ``views`` (all by default) and their ``extras`` now; returns the scene."""
        for v in range(self.num_views) if views is None else views:
            self.image(int(v))
            for kind in extras:
                self.extra(kind, int(v))
        return self

    def _decode(self, view: int) -> None:
        name = rgb_member(view, self._ext)
        data = self._read(name, view)
        if data is None:
            raise ShardError(f'{self.where} view {view}: no {name} member')
        try:
            # RGBA stays RGBA here: dropping alpha is a strided copy as slow as half a decode.
            img = decode_image(data)
            if img.dtype != np.uint8 or img.shape[-1] not in (3, 4):
                img = decode_image(data, 3)
        except Exception as e:
            raise ShardError(f'{self.where} view {view}: undecodable {self.image_format.upper()} {name} '
                             f'({type(e).__name__}: {e})') from None
        if img.dtype != np.uint8:
            raise ShardError(f'{self.where} view {view}: {img.dtype} pixels in {name} (8-bit '
                             'RGB or RGBA expected)')
        if img.shape[:2] != self._sizes[view]:
            raise ShardError(f'{self.where} view {view}: image size {list(img.shape[:2])} != '
                             f'{META} size {list(self._sizes[view])}')
        self._store(view, img)

    def _store(self, view: int, img: np.ndarray) -> None:
        if not self._stacked:
            if self._pixels is None:
                self._pixels = {}
            self._pixels[view] = img
        else:
            if self._pixels is None:
                self._pixels = np.empty((self.num_views, *self._sizes[0], img.shape[-1]), np.uint8)
            if img.shape[-1] == self._pixels.shape[-1]:
                self._pixels[view] = img
            else:  # RGB and RGBA views in one scene: only RGB is ever read
                self._pixels[view, ..., :3] = img[..., :3]
        self._decoded[view] = True

    def __getstate__(self) -> dict[str, Any]:
        # Pickled into and out of DataLoader workers: only the decoded views' pixels travel.
        state = dict(self.__dict__)
        if self._pixels is not None:
            state['_pixels'] = {v: self._pixels[v] for v in range(self.num_views)
                                if self._decoded[v]}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        pixels = state.pop('_pixels')
        self.__dict__.update(state, _pixels=None, _decoded=[False] * state['num_views'])
        for v, img in (pixels or {}).items():
            self._store(v, img)
