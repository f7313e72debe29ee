"""Shared test helpers and fixtures: test modules import helpers from here, never from each other."""
import functools
import json
import os
import pathlib
import shutil
import sys

import numpy as np
import pytest

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


# ----------------------------------------------------------------------------- sources and shards

def read_key_list(path: pathlib.Path) -> tuple[dict, dict]:
    """A reference state-dict key list (``config part key (shape)`` per line): ({config: {part:
    {key: shape}}}, {config: (encoder parameters, total)} from its '## config' count lines)."""
    keys, counts = {}, {}
    for line in path.read_text().splitlines():
        if line.startswith('## config'):
            words = line.split()
            counts[words[2].rstrip(':')] = (int(words[4]), int(words[-1]))
        if not line.strip() or line.startswith('#'):
            continue
        config, part, key, shape = line.split(' ', 3)
        dims = tuple(int(s) for s in shape.strip('()').split(',') if s.strip())
        keys.setdefault(config, {}).setdefault(part, {})[key] = dims
    return keys, counts


def make_nmr_copies(dst, n_train, n_val=2, prefix=''):
    """An NMR-layout source of n scenes, made of copies of the two test-vector scenes."""
    src = TESTVECTORS / 'sources'
    cls = dst / '02958343'
    cls.mkdir(parents=True)
    shutil.copy(src / 'nmr/metadata.yaml', dst / 'metadata.yaml')
    names = {'train': [], 'val': [], 'test': []}
    for split, count in (('train', n_train), ('val', n_val), ('test', n_val)):
        for i in range(count):
            name = f'{prefix}{split}{i:05d}'
            shutil.copytree(src / 'nmr/02958343' / ('scene00007', 'scene00008')[i % 2], cls / name)
            names[split].append(name)
        (cls / f'softras_{split}.lst').write_text(''.join(f'{n}\n' for n in names[split]))
    return dst


@pytest.fixture(scope='module')
def nmr_shards(tmp_path_factory):
    """The NMR test-vector scenes as shards, one scene per shard."""
    from pipeline.convert import ConvertConfig, convert
    out = tmp_path_factory.mktemp('nmr_shards')
    convert(ConvertConfig(dataset='nmr', src=str(TESTVECTORS / 'sources/nmr'), out=str(out),
                          scenes_per_shard=1, progress=False))
    return out


@pytest.fixture(scope='session')
def converted(tmp_path_factory):
    """NMR train (one scene per shard: train-000000 holds scene00007, train-000001 scene00008; 24
    64x64 PNG views) and CLEVR3D train (RGBA views), converted once per session; tests that change
    them use copies (``nmr``)."""
    from pipeline.convert import ConvertConfig, convert
    out = tmp_path_factory.mktemp('converted')
    convert(ConvertConfig(dataset='nmr', src=str(TESTVECTORS / 'sources/nmr'), out=str(out / 'nmr'),
                          splits=['train'], scenes_per_shard=1, progress=False))
    convert(ConvertConfig(dataset='clevr3d', src=str(TESTVECTORS / 'sources/clevr3d'),
                          out=str(out / 'clevr3d'), splits=['train'], progress=False))
    return out


@pytest.fixture
def nmr(converted, tmp_path):
    """A copy of ``converted``'s NMR shards to change."""
    shutil.copytree(converted / 'nmr', tmp_path / 'nmr')
    return tmp_path / 'nmr'


def reimported(shards, exported, source_format: str, out):
    """An export of ``shards`` converted back into ``out`` (dataset 'back'): (our scenes, {scene id:
    scene come back}) for each split that has scenes (an empty split exports nothing, so comes
    back as nothing)."""
    from pipeline.convert import ConvertConfig, convert
    from pipeline.reader import Scene, iter_shard, shard_urls
    from pipeline.verify import splits_in

    def scenes(directory, split):
        return [Scene(s) for url in shard_urls(str(directory), split) for s in iter_shard(url)]
    convert(ConvertConfig(dataset='back', src=str(exported), out=str(out), progress=False,
                          source_format=source_format))
    for split in splits_in(str(shards)):
        ours = scenes(shards, split)
        if ours:
            yield ours, {s.meta['scene_id']: s for s in scenes(out, split)}


@pytest.fixture(scope='session')
def msn_hard_source(tmp_path_factory):
    """Synthetic MSN-Hard (TFDS multi_shapenet_frames/2.8.0) at 64x64: train scene_0, scene_1, test
    scene_500000 (pipeline.synthetic variant msn-hard-demo, seed 3)."""
    from pipeline.synthetic import write_synthetic
    return write_synthetic('msn-hard-demo', tmp_path_factory.mktemp('msn_hard_src'), 3, seed=3,
                           workers=1)


@pytest.fixture(scope='session')
def msn_hard_shards(msn_hard_source, tmp_path_factory):
    """``msn_hard_source`` converted (dataset msn_hard, one scene per shard)."""
    from pipeline.convert import ConvertConfig, convert
    out = tmp_path_factory.mktemp('msn_hard_shards')
    convert(ConvertConfig(dataset='msn_hard', src=str(msn_hard_source.root), out=str(out),
                          scenes_per_shard=1, progress=False))
    return out


# ----------------------------------------------------------------------------- model and trainer

def tiny_batch(b=2, v=2, h=32, w=32, r=5, seed=0):
    """A random SRT batch: b scenes of v input views h x w, r target rays."""
    import torch
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(seed)
    rays = F.normalize(torch.randn(b, v, h, w, 3, generator=g), dim=-1)
    target_rays = F.normalize(torch.randn(b, r, 3, generator=g), dim=-1)
    return dict(input_images=torch.rand(b, v, 3, h, w, generator=g),
                input_camera_pos=torch.randn(b, v, 3, generator=g),
                input_rays=rays,
                target_camera_pos=torch.randn(b, r, 3, generator=g),
                target_rays=target_rays)


# A trainer config small enough for CPU tests (the trainer's and the evaluator's).
TINY_TRAIN = {
    'data': {'dataset': 'nmr', 'num_points': 32},
    'model': {'encoder_kwargs': {'pos_start_octave': -5, 'num_conv_blocks': 3, 'num_att_blocks': 1},
              'decoder': 'lightfield', 'decoder_kwargs': {'pos_start_octave': -5, 'num_att_blocks': 1}},
    'training': {'batch_size': 2, 'num_workers': 1, 'print_every': 1, 'visualize_every': 0,
                 'validate_every': 0, 'checkpoint_every': 3, 'backup_every': 0, 'max_it': 9,
                 'lr_warmup': 2, 'lr': 3e-4, 'deterministic': True, 'precision': 'fp32',
                 'shards_per_visit': 2, 'item_buffer': 8},
}
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}


def write_config(path, **training):
    """TINY_TRAIN with these training options, as YAML at path."""
    import yaml
    cfg = json.loads(json.dumps(TINY_TRAIN))
    cfg['training'].update(training)
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_cmd(shards, config, out, *extra):
    return [sys.executable, '-m', 'srt.train', '--shards', str(shards), '--config', str(config),
            '--out', str(out), *map(str, extra)]


def losses(run):
    """{iteration: (loss, lr)} from a run directory's metrics.jsonl."""
    records = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    return {r['it']: (r['loss'], r['lr']) for r in records if 'loss' in r}


@pytest.fixture(scope='session')
def shards_of(tmp_path_factory):
    """shards_of(name) -> a shard directory, converted once per session: 'nmr', 'clevr3d', 'msn'
    (the test vectors) or 're10k' (synthetic pixelSplat chunks with an evaluation index, imported)."""
    from pipeline.convert import ConvertConfig, convert
    made = {}

    def make(name):
        if name not in made:
            out = tmp_path_factory.mktemp(f'{name}_shards')
            if name == 're10k':
                from pipeline.synthetic import write_re10k
                src = tmp_path_factory.mktemp('re10k_src') / 're10k'
                write_re10k(src, 6, 3, split_sizes={'train': 2, 'test': 4}, scenes_per_chunk=2,
                            views=(5, 7), workers=1)
                convert(ConvertConfig(dataset='re10k', src=str(src), out=str(out), progress=False,
                                      source_format='pixelsplat'))
            else:
                convert(ConvertConfig(dataset=name, src=str(TESTVECTORS / 'sources' / name),
                                      out=str(out), progress=False))
            made[name] = out
        return made[name]
    return make
