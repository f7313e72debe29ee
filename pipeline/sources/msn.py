"""SRT MultiShapeNet (and OSRT's MSN-Hard) source reader: a TFDS dataset directory in sunds' frame
layout, without sunds.

``tensorflow_datasets.builder_from_directory`` supplies what the directory declares (version,
splits, tfrecord files and their record counts, the feature spec); the records themselves are read
with a small TFRecord framing reader and parsed as ``tf.train.Example`` protos, so PNG bytes are
carried unchanged and nothing is decoded. Whatever camera features exist are used: every image
feature other than ``color_image`` (``category_image``, ``instance_image``, ``depth_image``, ...) is
carried as a per-view PNG extra, other per-camera tensors as ``.npy`` extras.

MSN-Hard (dataset ``msn_hard``) is sunds' ``multi_shapenet_conditional`` version 2.8.0, which OSRT's
README puts in the same ``multi_shapenet_frames/`` directory as SRT's 2.3.3: the version selects it
(``version``, default 2.8.0 for msn_hard and 2.3.3, else the newest, for msn). It must have
``instance_image`` (carried as ``instance_VVV.png``, uint8 ids, bytes unchanged: OSRT's background
is ids 0 and 1, objects from 2); ``depth_image`` is TFDS's float32 image, stored as its 4 bytes per
pixel in an RGBA PNG (``depth_VVV.png``, bytes unchanged; ``pipeline.decode.float32_from_rgba``).

This is the only module of the project that imports TensorFlow; it hides all GPUs from it.
Cameras: ``pipeline.cameras.sunds_to_opencv`` (scene_from_camera = pose @ inverse(extrinsics)).
"""
from __future__ import annotations

import glob
import importlib.util
import os
import struct
import sys
import zlib
from typing import Any, Iterator, Sequence

import numpy as np

from pipeline import cameras
from pipeline.schema import SourceError, SourceScene, npy_bytes

DATASET_NAME = 'multi_shapenet_frames'
_CAMERA_FIELDS = ('intrinsics', 'extrinsics', 'color_image')


def import_tensorflow():
    """TensorFlow, on CPU only: it would otherwise reserve all GPU memory of the machine.

    Triton (installed with PyTorch) is loaded first when present: TensorFlow and Triton each bundle
    LLVM, and a process that loads TensorFlow first crashes with a segmentation fault as soon as
    Triton loads (which ``torch.optim.Adam`` or ``torch.compile`` do), while the other order works.
    """
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    if 'tensorflow' not in sys.modules and importlib.util.find_spec('triton') is not None:
        import triton  # noqa: F401
    import tensorflow as tf
    try:
        tf.config.set_visible_devices([], 'GPU')
    except RuntimeError:  # already initialised by someone else; devices can't change any more
        pass
    return tf


def _import_tf():
    import_tensorflow()
    import tensorflow_datasets as tfds
    from tensorflow.core.example import example_pb2
    return tfds, example_pb2


SRT_VERSION, MSN_HARD_VERSION = '2.3.3', '2.8.0'  # SRT's MultiShapeNet, OSRT's MSN-Hard


def dataset_versions(root: str) -> list[str]:
    """The versions under ``root/multi_shapenet_frames/`` holding a dataset_info.json, oldest first
    (``[]`` for none, or when ``root`` is itself a versioned directory)."""
    found = glob.glob(os.path.join(root, DATASET_NAME, '*', 'dataset_info.json'))
    return sorted((os.path.basename(os.path.dirname(p)) for p in found), key=_version_key)


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split('.') if p.isdigit())


def find_dataset_dir(root: str, version: str | None = None) -> str:
    """The versioned TFDS directory under ``root``: ``root`` itself when it holds a
    dataset_info.json, else ``root/multi_shapenet_frames/<version>`` (``version`` None: 2.3.3 if
    present, else the newest)."""
    if os.path.isfile(os.path.join(root, 'dataset_info.json')):
        return root
    versions = dataset_versions(root)
    if not versions:
        raise SourceError(f'{root}: no {DATASET_NAME}/<version>/dataset_info.json found '
                          '(expected the TFDS directory of SRT MultiShapeNet or MSN-Hard)')
    if version is None:
        version = SRT_VERSION if SRT_VERSION in versions else versions[-1]
    if version not in versions:
        raise SourceError(f'{root}: no {DATASET_NAME}/{version}/ (versions here: '
                          f'{", ".join(versions)})')
    return os.path.join(root, DATASET_NAME, version)


def dataset_of(root: str, version: str | None = None) -> str:
    """'msn_hard' when ``version`` is MSN-Hard's (2.8.0), or when none is given and ``root`` holds
    2.8.0 but not SRT's 2.3.3; else 'msn'."""
    if version is not None:
        return 'msn_hard' if version == MSN_HARD_VERSION else 'msn'
    versions = dataset_versions(root)
    return 'msn_hard' if MSN_HARD_VERSION in versions and SRT_VERSION not in versions else 'msn'


try:  # CRC32C in C (SSE4.2): verifying a 365 KB record costs ~14 us instead of ~100 ms in Python
    import google_crc32c
except ImportError:  # then records are not CRC-checked; PNG chunk CRCs still catch corrupt images
    google_crc32c = None


def _masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC32C of ``data``."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class TFRecordFile:
    """Sequential reader of one tfrecord file: cheap skipping by the framing, and reading with the
    length and data CRC32C checked (when google-crc32c is installed)."""

    verifies = google_crc32c is not None

    def __init__(self, path: str):
        self.path = path
        self.f = open(path, 'rb')
        self.index = 0  # index of the record at the current position

    def seek_record(self, index: int) -> None:
        if index < self.index:
            self.f.seek(0)
            self.index = 0
        while self.index < index:
            self._next(skip=True)

    def _next(self, skip: bool = False) -> bytes | None:
        header = self.f.read(12)
        if len(header) < 12:
            raise SourceError(f'{self.path}: truncated TFRecord at record {self.index} '
                              f'(byte {self.f.tell() - len(header)}; file ends mid-header)')
        (length,) = struct.unpack('<Q', header[:8])
        if skip:
            here = self.f.tell()
            self.f.seek(length + 4, os.SEEK_CUR)
            if self.f.tell() > os.fstat(self.f.fileno()).st_size:
                raise SourceError(f'{self.path}: truncated TFRecord at record {self.index} '
                                  f'(byte {here - 12}; record of {length} bytes)')
            self.index += 1
            return None
        data = self.f.read(length + 4)
        if len(data) < length + 4:
            raise SourceError(f'{self.path}: truncated TFRecord at record {self.index} '
                              f'(record of {length} bytes, {len(data)} present)')
        record = data[:length]
        if self.verifies and (_masked_crc(header[:8]) != struct.unpack('<I', header[8:])[0] or
                              _masked_crc(record) != struct.unpack('<I', data[length:])[0]):
            raise SourceError(f'{self.path}: corrupt TFRecord at record {self.index} (CRC32C '
                              'mismatch)')
        self.index += 1
        return record

    def read(self) -> bytes:
        return self._next()

    def close(self) -> None:
        self.f.close()


class MSNSource:
    def __init__(self, root: str, dataset: str = 'msn', version: str | None = None):
        if dataset not in ('msn', 'msn_hard'):
            raise ValueError(f'MSN dataset must be msn or msn_hard, got {dataset!r}')
        self.root, self.dataset = str(root), dataset
        if version is None and dataset == 'msn_hard':
            version = MSN_HARD_VERSION
        self.data_dir = find_dataset_dir(self.root, version)
        tfds, self._example_pb2 = _import_tf()
        try:
            builder = tfds.builder_from_directory(self.data_dir)
        except Exception as e:
            raise SourceError(f'{self.data_dir}: not a readable TFDS directory: {e}') from None
        info = builder.info
        self.version = str(info.version)
        features = info.features
        if 'cameras' not in features:
            raise SourceError(f'{self.data_dir}: features have no "cameras" (not a sunds frame layout)')
        # sunds stacks cameras in the order tf.data gives dict keys: sorted (so camera_10 would come
        # before camera_2). The reference's view indices are positions in that order.
        self.camera_names = sorted(features['cameras'].keys())
        cam = features['cameras'][self.camera_names[0]]
        self.image_extras, self.tensor_extras = [], {}
        for name in cam.keys():
            if name in _CAMERA_FIELDS:
                continue
            if isinstance(cam[name], tfds.features.Image):
                self.image_extras.append(name)
            elif isinstance(cam[name], tfds.features.Tensor):
                self.tensor_extras[name] = (cam[name].np_dtype, cam[name].shape,
                                            getattr(cam[name], '_encoding', None))
        if self.dataset == 'msn_hard' and 'instance_image' not in self.image_extras:
            raise SourceError(f'{self.data_dir}: no instance_image feature; MSN-Hard (OSRT\'s '
                              f'multi_shapenet_conditional {MSN_HARD_VERSION}) has one (is this '
                              'version SRT\'s MultiShapeNet? convert it as msn)')
        # Feature keys per camera, built once (the per-record parse is on the converter's hot path).
        self._extra_kinds = [(n.removesuffix('_image'), n) for n in self.image_extras] + \
            [(n, n) for n in self.tensor_extras]
        self._camera_keys = {}
        for cam in self.camera_names:
            p = f'cameras/{cam}/'
            self._camera_keys[cam] = {
                'color': p + 'color_image', 'type': p + 'intrinsics/type',
                'radial': p + 'intrinsics/distortion/radial',
                'tangential': p + 'intrinsics/distortion/tangential', 'K': p + 'intrinsics/K',
                'R': p + 'extrinsics/R', 't': p + 'extrinsics/t',
                'images': [(n.removesuffix('_image'), p + n) for n in self.image_extras],
                'tensors': [(n, p + n) for n in self.tensor_extras]}
        self._required = {key for k in self._camera_keys.values() for key in
                          [k[f] for f in ('color', 'type', 'radial', 'tangential', 'K', 'R', 't')]
                          + [key for _, key in k['images'] + k['tensors']]}
        self._files, self._lengths = {}, {}
        for split, split_info in info.splits.items():
            self._files[split] = [os.path.join(self.data_dir, f) for f in split_info.filenames]
            self._lengths[split] = list(split_info.shard_lengths)
        self._open: dict[str, TFRecordFile] = {}

    def splits(self) -> list[str]:
        return sorted(self._files, key=lambda s: ('train', 'val', 'test').index(s)
                      if s in ('train', 'val', 'test') else 3)

    def scene_refs(self, split: str) -> list[list[int]]:
        if split not in self._files:
            raise SourceError(f'{self.data_dir}: no split {split!r} (has {sorted(self._files)})')
        return [[f, r] for f, n in enumerate(self._lengths[split]) for r in range(n)]

    def read(self, split: str, refs: Sequence[Sequence[int]], start_index: int
             ) -> Iterator[SourceScene | SourceError]:
        for i, (file_index, record_index) in enumerate(refs):
            path = self._files[split][file_index]
            try:
                reader = self._open.get(path)
                if reader is None:
                    if not os.path.isfile(path):
                        raise SourceError(f'{path}: missing tfrecord file of split {split!r}')
                    reader = self._open[path] = TFRecordFile(path)
                reader.seek_record(record_index)
                record = reader.read()
                yield self._parse(split, record, path, record_index, start_index + i)
            except SourceError as e:
                yield e

    def _parse(self, split: str, record: bytes, path: str, record_index: int,
               index: int) -> SourceScene:
        where = f'{path}: record {record_index}'
        try:
            feats = self._example_pb2.Example.FromString(record).features.feature
        except Exception as e:
            raise SourceError(f'{where}: not a tf.train.Example ({e})') from None

        missing = self._required - set(feats.keys())
        if missing:
            raise SourceError(f'{where}: missing feature(s) {sorted(missing)[:5]}')

        scene_name = feats['scene_name'].bytes_list.value[0].decode() if 'scene_name' in feats \
            else None
        where = f'{path}: record {record_index} (scene {scene_name})'
        pose_R = np.reshape(feats['pose/R'].float_list.value, (3, 3)) if 'pose/R' in feats \
            else np.eye(3)
        pose_t = np.asarray(feats['pose/t'].float_list.value) if 'pose/t' in feats else np.zeros(3)
        images, Ks, Rs, ts = [], [], [], []
        extras: dict[str, list[bytes]] = {kind: [] for kind, _ in self._extra_kinds}
        try:
            for cam, k in self._camera_keys.items():
                images.append(feats[k['color']].bytes_list.value[0])
                intrinsics_type = feats[k['type']].bytes_list.value[0]
                distortion = list(feats[k['radial']].float_list.value) + \
                    list(feats[k['tangential']].float_list.value)
                if intrinsics_type != b'PERSPECTIVE' or max(map(abs, distortion)) > 1e-6:
                    raise SourceError(f'{where}: camera {cam} is {intrinsics_type.decode()} with '
                                      f'distortion {distortion}; only undistorted pinholes are '
                                      'supported')
                Ks += feats[k['K']].float_list.value
                Rs += feats[k['R']].float_list.value
                ts += feats[k['t']].float_list.value
                for kind, key in k['images']:
                    extras[kind].append(feats[key].bytes_list.value[0])
                for name, key in k['tensors']:
                    dtype, shape, encoding = self.tensor_extras[name]
                    extras[name].append(npy_bytes(self._tensor(feats[key], dtype, shape, encoding,
                                                               where)))
            V = len(self.camera_names)
            K = np.array(Ks, np.float64).reshape(V, 3, 3)
            # scene_from_camera = scene_from_frame @ inverse(camera_from_frame) (see
            # cameras.sunds_to_opencv); validated once, with the rest, when the scene is encoded.
            R = np.array(Rs, np.float64).reshape(V, 3, 3)
            t = np.array(ts, np.float64).reshape(V, 3)
            pR, pt = np.asarray(pose_R, np.float64), np.asarray(pose_t, np.float64)
            c2w = np.zeros((V, 4, 4))
            c2w[:, :3, :3] = pR @ R.transpose(0, 2, 1)
            c2w[:, :3, 3] = pt - np.einsum('vij,vj->vi', c2w[:, :3, :3], t)
            c2w[:, 3, 3] = 1.0
        except IndexError:  # a feature present but empty
            raise SourceError(f'{where}: an empty camera feature') from None
        except ValueError as e:  # camera validation or reshape of a malformed feature
            if isinstance(e, SourceError):
                raise
            raise SourceError(f'{where}: bad camera: {e}') from None
        return SourceScene(
            dataset=self.dataset, split=split,
            scene_id=scene_name if scene_name is not None else f'{os.path.basename(path)}-{record_index}',
            reference_index=index, view_names=list(self.camera_names), images=images,
            K=K, c2w=c2w, extras=extras,
            extras_ext={n: 'npy' for n in self.tensor_extras},
            checksummed=TFRecordFile.verifies,
            source_meta={
                'scene_name': scene_name,
                'frame_name': (feats['frame_name'].bytes_list.value[0].decode()
                               if 'frame_name' in feats else None),
                'frame_pose': {'R': np.asarray(pose_R, np.float64).tolist(),
                               't': np.asarray(pose_t, np.float64).tolist()},
                'intrinsics_type': intrinsics_type.decode(),
                'tfds_version': self.version,
                'tfrecord': os.path.basename(path), 'record': record_index},
            origin=path)

    @staticmethod
    def _tensor(feature, dtype, shape, encoding, where: str) -> np.ndarray:
        kind = feature.WhichOneof('kind')
        if kind == 'bytes_list':
            raw = feature.bytes_list.value[0]
            if str(encoding).lower().endswith('zlib'):
                raw = zlib.decompress(raw)
            arr = np.frombuffer(raw, dtype=dtype)
        elif kind in ('float_list', 'int64_list'):
            arr = np.asarray(getattr(feature, kind).value).astype(dtype)
        else:
            raise SourceError(f'{where}: empty tensor feature')
        return arr.reshape([d if d is not None else -1 for d in shape])

    def describe(self) -> dict[str, Any]:
        return {'dataset': self.dataset,
                'format': f'TFDS {DATASET_NAME} {self.version} (sunds frames)',
                'path': self.root, 'version': self.version, 'cameras': self.camera_names,
                'extras': [n.removesuffix('_image') for n in self.image_extras] +
                          list(self.tensor_extras)}
