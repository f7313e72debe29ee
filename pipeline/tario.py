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
import os
import stat
import zlib
from typing import BinaryIO, Iterable, Iterator

BLOCK = 512
END_OF_ARCHIVE = b'\0' * (2 * BLOCK)
_ZERO_BLOCK = b'\0' * BLOCK


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


def _byte_sum(block: bytes) -> int:
    """sum(block) of a 512-byte block, ~4x faster than ``sum``: Adler-32's low half is 1 + the
    byte sum mod 65521, exact for 256 bytes (at most 65280)."""
    return (zlib.adler32(block[:256]) & 0xffff) + (zlib.adler32(block[256:]) & 0xffff) - 2


def _parse_header(block: bytes, where: str, offset: int) -> tuple[str, int, bytes]:
    """(name, size, type flag) of the header ``block`` at byte ``offset`` of ``where``."""
    if len(block) < BLOCK:
        raise TarFormatError(f'{where} at byte {offset}: truncated tar header')
    try:
        size = int(block[124:136].rstrip(b'\0 ') or b'0', 8)
    except ValueError:
        raise TarFormatError(f'{where} at byte {offset}: corrupt tar header (size field '
                             f'{block[124:136]!r})') from None
    stored = block[148:156].rstrip(b'\0 ')
    check = _byte_sum(block) - sum(block[148:156]) + 256  # the checksum field counted as spaces
    if not stored or int(stored, 8) != check:
        raise TarFormatError(f'{where} at byte {offset}: tar header checksum mismatch')
    name = block[0:100].split(b'\0', 1)[0]
    if block[345]:
        name = block[345:500].split(b'\0', 1)[0] + b'/' + name
    return name.decode('utf-8'), size, block[156:157]


def iter_members(stream: BinaryIO, where: str = 'tar', require_end: bool = True,
                 defer: int | None = None) -> Iterator[tuple[str, 'bytes | FileMember', int]]:
    """Yield (name, data, header_offset) of each regular file in a ustar stream.

    Raises TarFormatError (naming ``where``) for a truncated or corrupt archive; a stream that ends
    without the end-of-archive marker is an error unless ``require_end`` is False (a slice holding
    one indexed sample). Non-file members (directories, pax headers) are skipped. Offsets are
    relative to the stream's start position. ``defer``: when ``stream`` is a regular file, members
    of at least this many bytes are yielded as ``FileMember``s, read only when asked for (a
    training stream decodes 6 of an RE10K clip's 100 JPEGs: reading the other 94 cost it more
    than half of its decoding time); other streams are read through as usual.
    """
    # A regular file with ``defer``: headers read by pread, members left in the file (FileMember)
    fd, base = (stream.fileno(), stream.tell()) if defer is not None and _regular_file(stream) \
        else (None, 0)
    offset = 0
    while True:
        block = stream.read(BLOCK) if fd is None else os.pread(fd, BLOCK, base + offset)
        if not block:
            if not require_end:
                return
            raise TarFormatError(f'{where}: truncated tar (no end-of-archive marker) at byte {offset}')
        if block == _ZERO_BLOCK:
            return
        name, size, kind = _parse_header(block, where, offset)
        padded = size + (-size % BLOCK)
        if fd is not None:
            if kind in (b'0', b'\0'):
                member = FileMember(stream, base + offset + BLOCK, size, where, name)
                yield name, (member.read() if size < defer else member), offset
        else:
            data = stream.read(padded)
            if len(data) < padded:
                raise TarFormatError(f'{where}: truncated tar member {name!r} at byte {offset}')
            if kind in (b'0', b'\0'):
                yield name, data[:size], offset
        offset += BLOCK + padded


def _regular_file(stream: BinaryIO) -> bool:
    try:
        return stat.S_ISREG(os.fstat(stream.fileno()).st_mode) and stream.seekable()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return False


class FileMember:
    """A member's data left in its shard file: ``read()`` (or ``bytes(member)``) reads it with
    ``os.pread`` while the file is open. Read after the file was closed, or from a file that shrank
    meanwhile (a shard rewritten in place), it raises TarFormatError naming the member. Located by
    a member index (``checked`` False), its header is read with it and must name it with its size.
    Pickles as its bytes."""
    __slots__ = ('file', 'offset', 'size', 'where', 'name', 'checked')

    def __init__(self, file: BinaryIO, offset: int, size: int, where: str, name: str,
                 checked: bool = True):
        self.file, self.offset, self.size, self.where, self.name = file, offset, size, where, name
        self.checked = checked

    def __len__(self) -> int:
        return self.size

    def read(self) -> bytes:
        try:
            fd = self.file.fileno()
            if not self.checked:  # the header apart: slicing it off would copy the data
                _check_indexed(os.pread(fd, BLOCK, self.offset - BLOCK), self.name, self.size,
                               self.where, self.offset - BLOCK)
            data = os.pread(fd, self.size, self.offset)
        except (ValueError, OSError) as e:  # ValueError: the file is closed
            raise TarFormatError(f'{self.where}: member {self.name!r} unreadable '
                                 f'({type(e).__name__}: {e})') from None
        if len(data) != self.size:
            raise TarFormatError(f'{self.where}: member {self.name!r} truncated ({len(data)} of '
                                 f'{self.size} bytes; the shard changed since it was opened?)')
        return data

    def __bytes__(self) -> bytes:
        return self.read()

    def __reduce__(self):
        return bytes, (self.read(),)


# ----------------------------------------------------------------------------- member index

# NVIDIA DALI's webdataset index (its tools/wds2idx.py, version v1.2): a first line
# "v1.2 <samples>", then a line per sample listing each member as
# "<extension> <data offset> <size> <member name>" (the offset is where its bytes start, after its
# 512-byte header). The converter writes one next to each shard (<shard>.idx) so that a reader can
# go to the members it needs without walking the headers of the others.
INDEX_VERSION = 'v1.2'
Layout = list[tuple[str, int, int]]  # one sample's members: (name, data offset, size)


def member_layout(members: Iterable[tuple[str, bytes]], start: int) -> Layout:
    """(name, data offset, size) of ``members`` as ``encode_members`` lays them out at byte
    ``start`` of a shard."""
    out = []
    for name, data in members:
        out.append((name, start + BLOCK, len(data)))
        start += BLOCK + len(data) + (-len(data) % BLOCK)
    return out


def index_text(samples: list[Layout]) -> str:
    """The ``.idx`` text of a shard whose samples have these layouts."""
    lines = [f'{INDEX_VERSION} {len(samples)}']
    for layout in samples:
        lines.append(' '.join(f'{split_key(n)[1]} {off} {size} {n}' for n, off, size in layout))
    return '\n'.join(lines) + '\n'


def read_index(path: str) -> list[Layout]:
    """The sample layouts of an ``.idx`` file; TarFormatError naming the file and line if it is
    not one."""
    with open(path) as f:
        lines = f.read().splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit() or \
            int(head[1]) != len(lines) - 1:
        raise TarFormatError(f'{path}: not a {INDEX_VERSION} member index of {len(lines) - 1} '
                             f'samples (first line {lines[0] if lines else ""!r})')
    out = []
    for i, line in enumerate(lines[1:], 2):
        tok = line.split()
        if not tok or len(tok) % 4:
            raise TarFormatError(f'{path} line {i}: not "<ext> <offset> <size> <name>" groups')
        try:
            layout = list(zip(tok[3::4], map(int, tok[1::4]), map(int, tok[2::4])))
        except ValueError:
            raise TarFormatError(f'{path} line {i}: offsets and sizes must be integers') from None
        if min(off for _, off, _ in layout) < BLOCK or min(n for _, _, n in layout) < 0:
            raise TarFormatError(f'{path} line {i}: a data offset under {BLOCK} (a member\'s data '
                                 'follows its 512-byte header) or a negative size')
        out.append(layout)
    return out


def index_path(shard: str) -> str:
    """Where a shard's member index lives: ``<split>-NNNNNN.idx`` beside ``<split>-NNNNNN.tar``."""
    return (shard[:-len('.tar')] if shard.endswith('.tar') else shard) + '.idx'


def sidecar_index(path: str, stream: BinaryIO) -> list[Layout] | None:
    """The member index ``<shard>.idx`` next to the local shard ``path`` (opened as ``stream``),
    or None: no such file, or one that is older than the shard or points past its end (a shard
    rewritten after its index: walk its headers instead)."""
    idx = index_path(path)
    try:
        st, ist = os.fstat(stream.fileno()), os.stat(idx)
    except (AttributeError, OSError, ValueError):
        return None
    if not stat.S_ISREG(st.st_mode) or ist.st_mtime_ns < st.st_mtime_ns or stream.tell():
        return None
    samples = read_index(idx)
    ends = [off + size for layout in samples for _, off, size in layout[-1:]]
    return samples if max(ends, default=0) + len(END_OF_ARCHIVE) <= st.st_size else None


def _check_indexed(data: bytes, name: str, size: int, where: str, offset: int) -> None:
    try:
        got, got_size, _ = _parse_header(data[:BLOCK], where, offset)
    except TarFormatError as e:
        found = f'no tar header there ({str(e).rsplit(": ", 1)[-1]})'
    else:
        if got == name and got_size == size:
            return
        found = f'the tar header there is {got!r} of {got_size} bytes'
    raise TarFormatError(f'{where} at byte {offset}: its member index puts {name!r} of {size} '
                         f'bytes there, but {found}: the index is stale (rewrite it with '
                         'pipeline.dali.write_dali_index, or delete it)')


def iter_indexed_samples(f: BinaryIO, samples: list[Layout], where: str, defer: int
                         ) -> Iterator[tuple[str, dict[str, 'bytes | FileMember']]]:
    """(key, {member: data}) of each sample of a regular file through its member index
    (``read_index``; WebDataset's key and member names, ``split_key``): members under ``defer``
    bytes read (with their headers, checked against the index), larger ones as ``FileMember``s
    that check their headers when read; no other header is read."""
    for layout in samples:
        key, members = split_key(layout[0][0])[0], {}
        cut = len(key) + 1
        for name, off, size in layout:
            if name[cut - 1:cut] != '.' or not name.startswith(key):
                raise TarFormatError(f'{where}: its member index puts {name!r} in sample {key!r}')
            member = FileMember(f, off, size, where, name, checked=False)
            members[name[cut:]] = member.read() if size < defer else member
        yield key, members


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
