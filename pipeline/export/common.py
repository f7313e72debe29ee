"""What the three exporters share: the guarded output directory, the scenes of a split (read through
``pipeline.reader`` only), progress bars, and each view's image as the target wants it."""
from __future__ import annotations

import io
import json
import os
from typing import Any, Iterator

import numpy as np

from pipeline.durable import atomic_write
from pipeline.camtransforms import resize_crop
from pipeline.reader import Scene, iter_shard, read_manifest, shard_table
from pipeline.schema import IMAGE_EXTS, image_info
from pipeline.verify import splits_in

# Dropped into every export directory: the format, the shard directory and the settings that wrote
# it. A non-empty directory without it (or with other settings) is never written into.
EXPORT_MARKER = 'srt_shards_export.json'


class ExportError(RuntimeError):
    """The export cannot go on (a foreign output directory, other settings, bad options)."""


def json_text(obj: Any, indent: int | None = None) -> bytes:
    return (json.dumps(obj, indent=indent, sort_keys=True) + '\n').encode()


def prepare_output(out: str, fmt: str, settings: dict[str, Any]) -> None:
    """Create ``out`` or check that it holds an earlier run of this very export (same format, shards
    and settings: then the run resumes); ExportError naming the directory otherwise."""
    marker = os.path.join(out, EXPORT_MARKER)
    want = json.loads(json_text({'format': fmt, **settings}))
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f'{out}: exists and is not a directory; choose another --out')
    if os.path.isdir(out) and os.listdir(out):
        if not os.path.isfile(marker):
            raise ExportError(f'{out}: not empty and not written by srt-shards export (no '
                              f'{EXPORT_MARKER}); choose an empty or new --out')
        with open(marker) as f:
            old = json.load(f)
        if old != want:
            diff = sorted(k for k in set(old) | set(want) if old.get(k) != want.get(k))
            raise ExportError(f'{out}: holds an export with other settings ({", ".join(diff)} '
                              'differ); use another --out or delete it')
        return
    os.makedirs(out, exist_ok=True)
    atomic_write(marker, json_text(want, indent=1), 'export marker')


def export_splits(shards: str, splits: list[str] | None) -> list[str]:
    have = splits_in(shards)
    for split in splits or []:
        if split not in have:
            raise ExportError(f'{shards}: no split {split!r} (splits here: {have})')
    return list(splits) if splits else have


def split_size(shards: str, split: str) -> int:
    return sum(n for _, n in shard_table(shards, split))


def dataset_of(shards: str, split: str) -> str:
    return str(read_manifest(shards, split).get('dataset') or 'dataset')


def read_evaluation_index(shards: str, split: str) -> dict[str, Any] | None:
    """The split's carried evaluation index ``{sample key: {"context": [...], "target": [...]} |
    null}`` (``<split>.evaluation_index.json`` next to the manifest, docs/SHARDS.md), or None."""
    path = os.path.join(shards, f'{split}.evaluation_index.json')
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            index = json.load(f)
    except ValueError as e:
        raise ExportError(f'{path}: unreadable evaluation index ({e})') from None
    if not isinstance(index, dict):
        raise ExportError(f'{path}: an evaluation index maps sample keys to entries')
    return index


def split_samples(shards: str, split: str) -> Iterator[dict[str, Any]]:
    """The split's samples in manifest order (parse each with ``Scene`` when it is exported)."""
    for url in [url for url, _ in shard_table(shards, split)]:
        yield from iter_shard(url)


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit='scenes', disable=not enabled, smoothing=0.1)


def parse_size(text: str | None) -> tuple[int, int] | None:
    """'360x640' -> (360, 640) (height x width); ValueError naming --size otherwise."""
    if text is None:
        return None
    try:
        h, w = (int(x) for x in text.lower().split('x'))
    except ValueError:
        raise ValueError(f'--size must be HxW, e.g. 360x640, got {text!r}') from None
    if h < 1 or w < 1:
        raise ValueError(f'--size must be positive, got {text!r}')
    return h, w


def encode(pixels: np.ndarray, jpeg_quality: int | None) -> tuple[bytes, str]:
    """PNG (lossless, zlib level 3: 3x faster than Pillow's default 6 for <1% more bytes; OpenCV's
    default, which LVSM's preprocessing uses) or JPEG (``jpeg_quality``, 4:2:0) bytes of [h, w, 3]
    uint8 pixels, and their extension; the same bytes on every run."""
    from PIL import Image
    buf = io.BytesIO()
    if jpeg_quality is None:
        Image.fromarray(pixels).save(buf, format='PNG', compress_level=3)
        return buf.getvalue(), 'png'
    Image.fromarray(pixels).save(buf, format='JPEG', quality=jpeg_quality)
    return buf.getvalue(), 'jpg'


def view_image(scene: Scene, view: int, size: tuple[int, int] | None = None,
               jpeg_quality: int | None = None, png: bool = False
               ) -> tuple[bytes, str, np.ndarray, tuple[int, int]]:
    """(bytes, extension, K [3, 3] pixels of those bytes, (h, w)) of ``view`` as a 3-channel
    target wants it. The stored bytes are kept when they are 3-channel and nothing asks for a
    change; RGBA/grey/palette views become RGB (alpha dropped, as ``Scene.image`` does); ``size``
    (h, w) resizes (Lanczos) and centre-crops with K adjusted; ``jpeg_quality`` re-encodes PNG views
    as JPEG; ``png`` re-encodes JPEG views as PNG (lossless from the decoded pixels)."""
    data = scene.image_bytes(view)
    h, w = scene.image_size(view)
    K = np.array(scene.K[view])
    _, _, mode, fmt = image_info(data, f'{scene.where} view {view}', crc=False)
    change_codec = (png and fmt == 'jpeg') or (jpeg_quality is not None and fmt == 'png')
    if size is None and mode == 'RGB' and not change_codec:
        return data, IMAGE_EXTS[fmt], K, (h, w)
    pixels = scene.image(view)
    if size is not None and size != (h, w):
        pixels, K = resize_crop(np.ascontiguousarray(pixels), K, *size)  # Lanczos, K exact
        h, w = size
    keep_jpeg = fmt == 'jpeg' and not png
    out, ext = encode(np.ascontiguousarray(pixels), jpeg_quality or (90 if keep_jpeg else None))
    return out, ext, K, (h, w)
