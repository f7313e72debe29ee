"""SRT MultiShapeNet source reader: a TFDS dataset directory in sunds' frame layout, without sunds.

``tensorflow_datasets.builder_from_directory`` supplies what the directory declares (version,
splits, tfrecord files and their record counts, the feature spec); the records themselves are read
with a small TFRecord framing reader and parsed as ``tf.train.Example`` protos, so PNG bytes are
carried unchanged and nothing is decoded. Whatever camera features exist are used: every image
feature other than ``color_image`` (``category_image``, ``instance_image``, ``depth_image``, ...) is
carried as a per-view PNG extra, other per-camera tensors as ``.npy`` extras.

This is the only module of the project that imports TensorFlow; it hides all GPUs from it.
Cameras: ``pipeline.cameras.sunds_to_opencv`` (scene_from_camera = pose @ inverse(extrinsics)).
"""
from __future__ import annotations

import glob
import os
import struct
import zlib
from typing import Any, Iterator, Sequence

import numpy as np

from pipeline import cameras
from pipeline.schema import SourceError, SourceScene, npy_bytes

DATASET_NAME = 'multi_shapenet_frames'
_CAMERA_FIELDS = ('intrinsics', 'extrinsics', 'color_image')


def _import_tf():
    """TensorFlow on CPU only: it would otherwise reserve all GPU memory of the machine."""
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    import tensorflow as tf
    try:
        tf.config.set_visible_devices([], 'GPU')
    except RuntimeError:  # already initialised by someone else; devices can't change any more
        pass
    import tensorflow_datasets as tfds
    from tensorflow.core.example import example_pb2
    return tfds, example_pb2


def find_dataset_dir(root: str) -> str:
    """The versioned TFDS directory under ``root`` (``root`` itself, or
    ``root/multi_shapenet_frames/<version>`` preferring 2.3.3, else the newest)."""
    if os.path.isfile(os.path.join(root, 'dataset_info.json')):
        return root
    candidates = glob.glob(os.path.join(root, DATASET_NAME, '*', 'dataset_info.json'))
    if not candidates:
        raise SourceError(f'{root}: no {DATASET_NAME}/<version>/dataset_info.json found '
                          '(expected the TFDS directory of SRT MultiShapeNet)')

    def version(path):
        return tuple(int(p) for p in os.path.basename(os.path.dirname(path)).split('.')
                     if p.isdigit())
    preferred = [c for c in candidates if os.path.basename(os.path.dirname(c)) == '2.3.3']
    return os.path.dirname(preferred[0] if preferred else max(candidates, key=version))


class TFRecordFile:
    """Sequential reader of one tfrecord file with cheap skipping (framing only, no CRC check:
    payload corruption is caught by the Example parse and the PNG chunk CRCs)."""

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
        self.index += 1
        return data[:length]

    def read(self) -> bytes:
        return self._next()

    def close(self) -> None:
        self.f.close()


class MSNSource:
    dataset = 'msn'

    def __init__(self, root: str):
        self.root = str(root)
        self.data_dir = find_dataset_dir(self.root)
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

        def get(key: str, kind: str):
            if key not in feats:
                raise SourceError(f'{where}: missing feature {key!r}')
            return getattr(feats[key], kind).value

        scene_name = get('scene_name', 'bytes_list')[0].decode() if 'scene_name' in feats else None
        where = f'{path}: record {record_index} (scene {scene_name})'
        pose_R = np.reshape(get('pose/R', 'float_list'), (3, 3)) if 'pose/R' in feats else np.eye(3)
        pose_t = np.asarray(get('pose/t', 'float_list')) if 'pose/t' in feats else np.zeros(3)
        images, Ks, poses = [], [], []
        extras: dict[str, list[bytes]] = {n.removesuffix('_image'): [] for n in self.image_extras}
        extras.update({n: [] for n in self.tensor_extras})
        intrinsics_type = None
        try:
            for cam in self.camera_names:
                p = f'cameras/{cam}/'
                images.append(get(p + 'color_image', 'bytes_list')[0])
                intrinsics_type = get(p + 'intrinsics/type', 'bytes_list')[0].decode()
                distortion = np.concatenate([get(p + 'intrinsics/distortion/radial', 'float_list'),
                                             get(p + 'intrinsics/distortion/tangential',
                                                 'float_list')])
                if intrinsics_type != 'PERSPECTIVE' or np.any(np.abs(distortion) > 1e-6):
                    raise SourceError(f'{where}: camera {cam} is {intrinsics_type} with distortion '
                                      f'{distortion.tolist()}; only undistorted pinholes are supported')
                K, pose = cameras.sunds_to_opencv(
                    np.reshape(get(p + 'intrinsics/K', 'float_list'), (3, 3)),
                    np.reshape(get(p + 'extrinsics/R', 'float_list'), (3, 3)),
                    get(p + 'extrinsics/t', 'float_list'), pose_R, pose_t)
                Ks.append(K)
                poses.append(pose)
                for name in self.image_extras:
                    extras[name.removesuffix('_image')].append(get(p + name, 'bytes_list')[0])
                for name, (dtype, shape, encoding) in self.tensor_extras.items():
                    extras[name].append(npy_bytes(self._tensor(feats[p + name], dtype, shape,
                                                               encoding, where)))
        except ValueError as e:  # camera validation or reshape of a malformed feature
            if isinstance(e, SourceError):
                raise
            raise SourceError(f'{where}: bad camera: {e}') from None
        return SourceScene(
            dataset=self.dataset, split=split,
            scene_id=scene_name if scene_name is not None else f'{os.path.basename(path)}-{record_index}',
            reference_index=index, view_names=list(self.camera_names), images=images,
            K=np.stack(Ks), c2w=np.stack(poses), extras=extras,
            extras_ext={n: 'npy' for n in self.tensor_extras},
            source_meta={
                'scene_name': scene_name,
                'frame_name': (get('frame_name', 'bytes_list')[0].decode()
                               if 'frame_name' in feats else None),
                'frame_pose': {'R': np.asarray(pose_R, np.float64).tolist(),
                               't': np.asarray(pose_t, np.float64).tolist()},
                'intrinsics_type': intrinsics_type,
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
        return {'dataset': 'msn', 'format': f'TFDS {DATASET_NAME} {self.version} (sunds frames)',
                'path': self.root, 'version': self.version, 'cameras': self.camera_names,
                'extras': [n.removesuffix('_image') for n in self.image_extras] +
                          list(self.tensor_extras)}
