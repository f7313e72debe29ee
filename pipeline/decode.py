"""PNG decoding with the fastest decoder installed.

Measured on this project's machine (one core, 128x128 RGB renders): kornia-rs (Rust) 2-2.6x faster
than ``torchvision.io.decode_png``, which is the fallback (``tools/bench_loader.py`` reports the
decoder in use). Palette and grey+alpha PNGs, which neither handles directly, go through Pillow.
"""
from __future__ import annotations

import io

import numpy as np

from pipeline.schema import PNG_MODES

try:
    from kornia_rs.image import Image as _KImage
except ImportError:  # optional extra 'fast'
    _KImage = None

DECODER = 'kornia-rs' if _KImage is not None else 'torchvision'


def png_mode(data: bytes) -> str:
    """Colour mode of a PNG from its IHDR ('L', 'RGB', 'RGBA', 'P', 'LA')."""
    return PNG_MODES.get(data[25], '?') if len(data) > 25 else '?'


def decode_png(data: bytes, channels: int | None = None) -> np.ndarray:
    """Decode PNG bytes to an [h, w, c] array (uint8, or uint16 for 16-bit PNGs).

    ``channels`` 3 returns RGB (alpha dropped, as the reference loaders do), 1 a single channel,
    None the file's own channels.
    """
    mode = png_mode(data)
    if mode in ('P', 'LA', '?'):
        from PIL import Image
        img = Image.open(io.BytesIO(data))
        arr = np.asarray(img.convert('RGBA' if mode == 'LA' else 'RGB') if mode != '?' else img)
        if arr.ndim == 2:
            arr = arr[..., None]
    elif _KImage is not None:
        arr = np.asarray(_KImage.decode(data, mode))
        if arr.ndim == 2:
            arr = arr[..., None]
    else:
        import torch
        import torchvision
        arr = torchvision.io.decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        arr = arr.permute(1, 2, 0).numpy()
    if channels is None or arr.shape[-1] == channels:
        return arr
    if channels == 3 and arr.shape[-1] >= 3:
        return arr[..., :3]
    if channels == 3 and arr.shape[-1] in (1, 2):
        return np.repeat(arr[..., :1], 3, axis=-1)
    if channels == 1:
        return arr[..., :1]
    raise ValueError(f'cannot convert a {arr.shape[-1]}-channel PNG to {channels} channels')


def float32_from_rgba(rgba: np.ndarray) -> np.ndarray:
    """[h, w, 1] float32 of a TFDS float32 ``Image`` (e.g. MSN-Hard's ``depth_image``) decoded from
    its PNG as [h, w, 4] uint8: TFDS stores each float's 4 little-endian bytes in the 4 channels
    (tensorflow_datasets ``image_feature._FloatImageEncoder``)."""
    if rgba.dtype != np.uint8 or rgba.ndim != 3 or rgba.shape[-1] != 4:
        raise ValueError(f'a float32 image is stored as [h, w, 4] uint8, got {rgba.dtype} '
                         f'{list(rgba.shape)}')
    return np.ascontiguousarray(rgba).view('<f4').astype(np.float32)
