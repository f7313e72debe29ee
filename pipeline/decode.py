"""PNG and JPEG decoding with the fastest decoder installed (``decode_image``).

Measured on this project's machine (one core of a shared 2-core VM, ``python tools/bench_loader.py
--sets re10k`` prints the decoder in use):
- PNG, 128x128 RGB renders: kornia-rs (Rust) 2-2.6x faster than ``torchvision.io.decode_png``.
- JPEG, 360x640 RGB (RE10K's size, quality 90, 4:2:0): kornia-rs 1.55 ms, torchvision.io.decode_jpeg
  1.75 ms, Pillow 2.34 ms (+0.8 ms for ``convert('RGB')``) per image; the pixels are identical
  (all three use libjpeg-turbo's or an equivalent exact IDCT). kornia-rs 0.2's
  ``io.decode_image_jpegturbo``: 1.16 ms against its ``Image.decode``'s 1.25-1.31 ms in one run
  (same pixels), so JPEGs go through it where it exists.
kornia-rs is used where installed (extra 'fast'), else torchvision. Palette, grey+alpha PNGs and CMYK
JPEGs, which neither handles directly, go through Pillow.
"""
from __future__ import annotations

import io

import numpy as np

from pipeline.schema import PNG_MODES, image_format

try:
    from kornia_rs.image import Image as _KImage
except ImportError:  # optional extra 'fast'
    _KImage = None
try:  # kornia-rs's libjpeg-turbo entry point: ~8% faster than Image.decode, the same pixels
    from kornia_rs.io import decode_image_jpegturbo as _k_jpeg
except ImportError:
    _k_jpeg = None

DECODER = 'kornia-rs' if _KImage is not None else 'torchvision'


def png_mode(data: bytes) -> str:
    """Colour mode of a PNG from its IHDR ('L', 'RGB', 'RGBA', 'P', 'LA')."""
    return PNG_MODES.get(data[25], '?') if len(data) > 25 else '?'


def jpeg_components(data: bytes) -> int | None:
    """Colour components of a JPEG (1 grey, 3 colour, 4 CMYK) from its frame header; None if the
    header is not found (the decoder then reports the problem)."""
    pos, n = 2, len(data)
    while pos + 10 <= n and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD8:
            pos += 1 if marker == 0xFF else 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return data[pos + 9]
        if marker in (0xD9, 0xDA):
            return None
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], 'big')
    return None


def _pillow(data: bytes, convert: str | None) -> np.ndarray:
    from PIL import Image
    img = Image.open(io.BytesIO(data))
    arr = np.asarray(img.convert(convert) if convert else img)
    return arr[..., None] if arr.ndim == 2 else arr


def _decode_jpeg(data: bytes, channels: int | None) -> np.ndarray:
    comps = jpeg_components(data)
    mode = 'L' if channels == 1 or (channels is None and comps == 1) else 'RGB'
    if comps == 4:  # CMYK: Pillow converts it
        return _pillow(data, mode)
    if _k_jpeg is not None:
        arr = _k_jpeg(data, 'mono' if mode == 'L' else 'rgb')
    elif _KImage is not None:
        arr = np.asarray(_KImage.decode(data, mode))
    else:
        import torch
        import torchvision
        read = torchvision.io.ImageReadMode.GRAY if mode == 'L' else torchvision.io.ImageReadMode.RGB
        arr = torchvision.io.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                         mode=read).permute(1, 2, 0).numpy()
    return arr[..., None] if arr.ndim == 2 else arr


def decode_png(data: bytes, channels: int | None = None) -> np.ndarray:
    """Decode PNG bytes to an [h, w, c] array (uint8, or uint16 for 16-bit PNGs).

    ``channels`` 3 returns RGB (alpha dropped, as the reference loaders do), 1 a single channel,
    None the file's own channels.
    """
    mode = png_mode(data)
    if mode in ('P', 'LA', '?'):
        arr = _pillow(data, ('RGBA' if mode == 'LA' else 'RGB') if mode != '?' else None)
    elif mode == 'L' and data[24] < 8:  # 1/2/4-bit grey (CO3D's depth masks): kornia-rs refuses
        arr = _pillow(data, 'L')  # 0..255 (a 1-bit PNG's 1 is 255)
    elif _KImage is not None:
        arr = np.asarray(_KImage.decode(data, mode))
        if arr.ndim == 2:
            arr = arr[..., None]
    else:
        import torch
        import torchvision
        arr = torchvision.io.decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        arr = arr.permute(1, 2, 0).numpy()
    return _channels(arr, channels, 'PNG')


def decode_image(data: bytes, channels: int | None = None) -> np.ndarray:
    """Decode PNG or JPEG bytes (the format from the signature) to an [h, w, c] array: uint8 (or
    uint16 for 16-bit PNGs). ``channels`` as in ``decode_png``; a JPEG's own channels are 1 (grey)
    or 3 (colour; CMYK is converted to RGB). ValueError for another format."""
    fmt = image_format(data)
    if fmt == 'png':
        return decode_png(data, channels)
    if fmt == 'jpeg':
        return _channels(_decode_jpeg(data, channels), channels, 'JPEG')
    raise ValueError(f'neither a PNG nor a JPEG (signature {bytes(data[:4])!r})')


def _channels(arr: np.ndarray, channels: int | None, what: str) -> np.ndarray:
    if channels is None or arr.shape[-1] == channels:
        return arr
    if channels == 3 and arr.shape[-1] >= 3:
        return arr[..., :3]
    if channels == 3 and arr.shape[-1] in (1, 2):
        return np.repeat(arr[..., :1], 3, axis=-1)
    if channels == 1:
        return arr[..., :1]
    raise ValueError(f'cannot convert a {arr.shape[-1]}-channel {what} to {channels} channels')


def float32_from_rgba(rgba: np.ndarray) -> np.ndarray:
    """[h, w, 1] float32 of a TFDS float32 ``Image`` (e.g. MSN-Hard's ``depth_image``) decoded from
    its PNG as [h, w, 4] uint8: TFDS stores each float's 4 little-endian bytes in the 4 channels
    (tensorflow_datasets ``image_feature._FloatImageEncoder``)."""
    if rgba.dtype != np.uint8 or rgba.ndim != 3 or rgba.shape[-1] != 4:
        raise ValueError(f'a float32 image is stored as [h, w, 4] uint8, got {rgba.dtype} '
                         f'{list(rgba.shape)}')
    return np.ascontiguousarray(rgba).view('<f4').astype(np.float32)
