"""Minimal, deterministic ustar writing and fast member iteration for WebDataset shards.

Python's ``tarfile`` (which WebDataset uses) costs ~20 us per member, as much as decoding a 64x64
PNG; our shards have 10-30 members per scene, so both the converter and the training stream use
these small routines instead (``tools/bench_loader.py`` and ``tools/bench_convert.py`` measure the
difference). The archives are plain POSIX ustar: any tar reader, ``tarfile`` and WebDataset read them.

Determinism: every header has mtime 0, uid/gid 0, empty user/group names and mode 0644, and members
are written in the order given, so the same samples always give the same bytes.
"""
from __future__ import annotations

import io
from typing import BinaryIO, Iterable, Iterator

BLOCK = 512
END_OF_ARCHIVE = b'\0' * (2 * BLOCK)


class TarFormatError(ValueError):
    """A tar stream that is truncated or not a ustar archive."""


def _octal(value: int, width: int) -> bytes:
    digits = b'%o' % value
    if len(digits) > width - 1:
        raise ValueError(f'tar field overflow: {value} does not fit {width - 1} octal digits')
    return digits.rjust(width - 1, b'0') + b'\0'


def _header_template() -> bytearray:
    header = bytearray(BLOCK)
    header[100:108] = _octal(0o644, 8)
    header[108:116] = _octal(0, 8)
    header[116:124] = _octal(0, 8)
    header[136:148] = _octal(0, 12)
    header[156:157] = b'0'
    header[257:263] = b'ustar\0'
    header[263:265] = b'00'
    return header


_TEMPLATE = bytes(_header_template())
_TEMPLATE_SUM = sum(_TEMPLATE) + 8 * ord(' ')  # checksum field counted as spaces


def member_header(name: str, size: int) -> bytes:
    """A 512-byte ustar header for a regular file ``name`` of ``size`` bytes (deterministic fields:
    mode 0644, uid/gid 0, mtime 0, no user/group names)."""
    raw = name.encode('utf-8')
    prefix = b''
    if len(raw) > 100:  # ustar splits long paths at a '/' into prefix (155) + name (100)
        cut = raw.rfind(b'/', 0, 156)
        if cut <= 0 or len(raw) - cut - 1 > 100:
            raise ValueError(f'member name too long for ustar: {name!r}')
        prefix, raw = raw[:cut], raw[cut + 1:]
    header = bytearray(_TEMPLATE)
    header[0:len(raw)] = raw
    size_field = _octal(size, 12)
    header[124:136] = size_field
    header[345:345 + len(prefix)] = prefix
    # Only the name, size and prefix differ from the template: update its checksum by their bytes.
    check = _TEMPLATE_SUM + sum(raw) + sum(size_field) - sum(_TEMPLATE[124:136]) + sum(prefix)
    header[148:156] = b'%06o\0 ' % check
    return bytes(header)


def padding(size: int) -> bytes:
    return b'\0' * (-size % BLOCK)


def encode_members(members: Iterable[tuple[str, bytes]]) -> bytes:
    """Headers, data and padding of ``members`` (name, bytes), without the end-of-archive marker."""
    parts = []
    for name, data in members:
        parts.append(member_header(name, len(data)))
        parts.append(data)
        parts.append(padding(len(data)))
    return b''.join(parts)


def _parse_header(block: bytes, where: str) -> tuple[str, int, bytes]:
    if len(block) < BLOCK:
        raise TarFormatError(f'{where}: truncated tar header')
    try:
        size = int(block[124:136].rstrip(b'\0 ').decode() or '0', 8)
    except ValueError:
        raise TarFormatError(f'{where}: corrupt tar header (size field {block[124:136]!r})') from None
    stored = block[148:156].rstrip(b'\0 ')
    check = sum(block[:148]) + 256 + sum(block[156:])
    if not stored or int(stored, 8) != check:
        raise TarFormatError(f'{where}: tar header checksum mismatch')
    name = block[0:100].split(b'\0', 1)[0]
    prefix = block[345:500].split(b'\0', 1)[0]
    if prefix:
        name = prefix + b'/' + name
    return name.decode('utf-8'), size, block[156:157]


def iter_members(stream: BinaryIO, where: str = 'tar',
                 require_end: bool = True) -> Iterator[tuple[str, bytes, int]]:
    """Yield (name, data, header_offset) of each regular file in a ustar stream.

    Raises TarFormatError (naming ``where``) for a truncated or corrupt archive; a stream that ends
    without the end-of-archive marker is an error unless ``require_end`` is False (a slice holding
    one indexed sample). Non-file members (directories, pax headers) are skipped. Offsets are
    relative to the stream's start position.
    """
    offset = 0
    read = stream.read
    while True:
        block = read(BLOCK)
        if not block:
            if not require_end:
                return
            raise TarFormatError(f'{where}: truncated tar (no end-of-archive marker) at byte {offset}')
        if block == b'\0' * BLOCK:
            return
        name, size, kind = _parse_header(block, f'{where} at byte {offset}')
        padded = size + (-size % BLOCK)
        data = read(padded)
        if len(data) < padded:
            raise TarFormatError(f'{where}: truncated tar member {name!r} at byte {offset}')
        if kind in (b'0', b'\0'):
            yield name, data[:size], offset
        offset += BLOCK + padded


def iter_members_bytes(buf: bytes, where: str = 'tar',
                       require_end: bool = True) -> Iterator[tuple[str, bytes]]:
    """``iter_members`` over an in-memory buffer (a whole shard or one indexed sample)."""
    for name, data, _ in iter_members(io.BytesIO(buf), where, require_end):
        yield name, data


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is everything before the first dot of the basename.

    >>> split_key('msn_train_scene_7.rgb_000.png')
    ('msn_train_scene_7', 'rgb_000.png')
    """
    slash = name.rfind('/') + 1
    dot = name.find('.', slash)
    if dot < 0:
        return name, ''
    return name[:dot], name[dot + 1:]
