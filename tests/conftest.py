import functools
import os
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
TESTVECTORS = ROOT / 'tests' / 'data' / 'testvectors'
if str(ROOT) not in sys.path:  # tools/ and tests/ import the packages from a plain checkout too
    sys.path.insert(0, str(ROOT))

# TensorFlow must never take a GPU in tests, and must stay quiet.
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')


@functools.lru_cache(maxsize=None)
def read_msn_test_cameras() -> dict:
    """K and world_from_cam [10, ...] of the MSN test-vector scenes, read with plain tfds (independent
    of the project's MSN reader)."""
    from pipeline.sources.msn import import_tensorflow
    import_tensorflow()  # before tfds: see its docstring
    import tensorflow_datasets as tfds
    from pipeline import cameras as C

    builder = tfds.builder_from_directory(
        str(TESTVECTORS / 'sources/msn/multi_shapenet_frames/2.3.3'))
    out = {}
    for ex in tfds.as_numpy(builder.as_dataset(split='train', shuffle_files=False)):
        Ks, poses = [], []
        for i in range(10):
            cam = ex['cameras'][f'camera_{i}']
            K, pose = C.sunds_to_opencv(cam['intrinsics']['K'], cam['extrinsics']['R'],
                                        cam['extrinsics']['t'], ex['pose']['R'], ex['pose']['t'])
            Ks.append(K)
            poses.append(pose)
        out[ex['scene_name'].decode()] = {'K': np.stack(Ks), 'world_from_cam': np.stack(poses)}
    return out
