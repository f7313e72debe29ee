"""Converters: parity of stored cameras, byte-exact images, resumability, task splitting, bad input."""
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pipeline import cameras, tario
from pipeline.convert import ConvertConfig, ConvertError, convert
from pipeline.index import SceneIndex, read_scene
from pipeline.reader import Scene, iter_shard, shard_urls
from pipeline.verify import verify
from tests.conftest import ROOT, TESTVECTORS, make_nmr_copies

SRC = TESTVECTORS / 'sources'
REF = TESTVECTORS / 'reference'


def run_convert(dataset, src, out, **kw):
    cfg = ConvertConfig(dataset=dataset, src=str(src), out=str(out), progress=False, **kw)
    return convert(cfg)


def cli(tool, *args, check=True):
    proc = subprocess.run([sys.executable, str(ROOT / 'tools' / tool), *map(str, args), '--no-progress'],
                          capture_output=True, text=True, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout + proc.stderr)
    return proc


def all_samples(out, split):
    return [s for url in shard_urls(str(out), split) for s in iter_shard(url)]


def tree_bytes(out) -> dict:
    """name -> sha256 of every file a reader sees (shards, manifests, logs, card)."""
    return {n: hashlib.sha256(open(os.path.join(out, n), 'rb').read()).hexdigest()
            for n in sorted(os.listdir(out))
            if n.endswith(('.tar', '.idx', '.manifest.json', '.jsonl', 'README.md'))}


# ----------------------------------------------------------------------------- parity and bytes

def test_nmr_shards_verify_reproduce_reference_rays_and_keep_png_bytes(tmp_path):
    run_convert('nmr', SRC / 'nmr', tmp_path)
    assert verify(str(tmp_path), progress=False) == []
    # Each shard's member index is checked against its tar headers.
    idx = sorted(tmp_path.glob('train-*.idx'))[0]
    lines = idx.read_text().splitlines()
    assert lines[0].startswith('v1.2 ') and len(lines) > 1
    tok = lines[1].split()
    tok[5] = str(int(tok[5]) + 512)  # the second member's data offset
    idx.write_text('\n'.join([lines[0], ' '.join(tok)] + lines[2:]) + '\n')
    assert verify(str(tmp_path), progress=False) == [
        f'{idx}: member index differs from the shard\'s tar headers from line 2 (rebuild it: '
        'pipeline.dali.write_dali_index)']
    from pipeline.dali import write_dali_index
    write_dali_index(str(idx)[:-len('.idx')] + '.tar')
    assert verify(str(tmp_path), progress=False) == []
    info = json.loads((REF / 'index.json').read_text())
    for name in ('nmr_train_item0', 'nmr_train_item11'):
        item = info[f'{name}_world.npz']
        ref = np.load(REF / f'{name}_world.npz')
        scene = read_scene(str(tmp_path), 'train', f'nmr_train_{item["scene"].replace("/", "-")}')
        v = item['input_view']
        _, d = cameras.image_rays(scene.K[v], scene.c2w[v], 64, 64)
        assert np.abs(d - ref['input_rays'][0]).max() <= 1e-5
        assert np.abs(scene.c2w[v, :3, 3] - ref['input_camera_pos'][0]).max() <= 1e-5
        np.testing.assert_array_equal(scene.image(v).transpose(2, 0, 1) / np.float32(255),
                                      ref['input_images'][0])
    for sample in all_samples(tmp_path, 'val'):
        meta = json.loads(sample['meta.json'])
        for v in range(24):
            src = SRC / 'nmr' / meta['scene_id'] / 'image' / f'{v:04d}.png'
            assert sample[f'rgb_{v:03d}.png'] == src.read_bytes()


def test_clevr3d_shards_reproduce_reference_rays_and_keep_png_bytes(tmp_path):
    run_convert('clevr3d', SRC / 'clevr3d', tmp_path)
    assert verify(str(tmp_path), progress=False) == []
    for item, scene_id, view in ((0, 0, 0), (5, 1, 2)):
        ref = np.load(REF / f'clevr3d_train_item{item}_world.npz')
        scene = SceneIndex(str(tmp_path), 'train').read(f'clevr3d_train_{scene_id}')
        _, d = cameras.image_rays(scene.K[view], scene.c2w[view], 240, 320)
        assert np.abs(d - ref['input_rays'][0]).max() <= 1e-5
        assert np.abs(scene.c2w[view, :3, 3] - ref['input_camera_pos'][0]).max() <= 1e-5
    for sample in all_samples(tmp_path, 'test'):
        sid = json.loads(sample['meta.json'])['scene_id']
        for v in range(3):  # RGBA PNG bytes are carried unchanged
            assert sample[f'rgb_{v:03d}.png'] == (SRC / f'clevr3d/images/img_{sid}_{v}.png').read_bytes()
    manifest = json.loads((tmp_path / 'train.manifest.json').read_text())
    assert manifest['num_filtered_max_objects'] == 70000 - 2  # as the reference's max_objects=6


def test_msn_shards_reproduce_sunds_rays_and_keep_png_bytes(tmp_path):
    from pipeline.sources.msn import import_tensorflow
    import_tensorflow()  # before tfds: see its docstring
    import tensorflow_datasets as tfds
    run_convert('msn', SRC / 'msn', tmp_path)
    assert verify(str(tmp_path), progress=False) == []
    builder = tfds.builder_from_directory(str(SRC / 'msn/multi_shapenet_frames/2.3.3'))
    raw = {}
    decoders = {'cameras': {f'camera_{i}': {'color_image': tfds.decode.SkipDecoding(),
                                            'category_image': tfds.decode.SkipDecoding()}
                            for i in range(10)}}
    for ex in tfds.as_numpy(builder.as_dataset(split='train', decoders=decoders)):
        raw[ex['scene_name'].decode()] = ex
    index = SceneIndex(str(tmp_path), 'train')
    assert sorted(index.keys()) == ['msn_train_scene_7', 'msn_train_scene_8']
    for name in ('scene_7', 'scene_8'):
        sample = index.read_sample(f'msn_train_{name}')
        scene = Scene(sample)
        ref = np.load(REF / f'msn_train_{name}_sunds_world_rays.npz')
        o, d = cameras.image_rays(scene.K, scene.c2w, 128, 128)
        assert np.abs(d - ref['ray_directions']).max() <= 1e-5
        assert np.abs(o - ref['ray_origins']).max() <= 1e-5
        np.testing.assert_array_equal(scene.images(), ref['color_image'])
        for v in range(10):
            cam = raw[name]['cameras'][f'camera_{v}']
            assert sample[f'rgb_{v:03d}.png'] == cam['color_image']
            assert sample[f'category_{v:03d}.png'] == cam['category_image']
    # The reference index is sunds' order of the split (the tfrecord order).
    assert index.key_of(0) == 'msn_train_scene_8'


# ----------------------------------------------------------------------------- resumability

def test_sigkill_at_random_points_then_rerun_gives_identical_bytes(tmp_path):
    src = make_nmr_copies(tmp_path / 'src', 300)
    args = ['--src', src, '--scenes-per-shard', 3]
    cli('convert_nmr.py', *args, '--out', tmp_path / 'clean')
    want = tree_bytes(tmp_path / 'clean')
    out = tmp_path / 'killed'
    rng = random.Random(0)
    kills = 0
    for _ in range(4):
        before = set(os.listdir(out)) if out.exists() else set()
        proc = subprocess.Popen([sys.executable, str(ROOT / 'tools/convert_nmr.py'), *map(str, args),
                                 '--out', str(out), '--no-progress'], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Kill mid-conversion, not before it starts or after it ends (the start-up time of the
        # process varies far more than the conversion takes): once this run wrote a new file,
        # at a random moment within the next few shards.
        while proc.poll() is None and (set(os.listdir(out)) if out.exists() else set()) <= before:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.03))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        # Whatever a kill left, every visible .tar is a whole shard.
        for name in os.listdir(out) if out.exists() else []:
            if name.endswith('.tar'):
                list(tario.iter_members(open(out / name, 'rb'), name))
    assert kills >= 1
    cli('convert_nmr.py', *args, '--out', out)
    assert tree_bytes(out) == want


@pytest.mark.parametrize('dataset', ['nmr', 'clevr3d', 'msn'])
def test_rerunning_a_finished_conversion_is_safe_and_changes_nothing(tmp_path, dataset):
    src = SRC / {'nmr': 'nmr', 'clevr3d': 'clevr3d', 'msn': 'msn'}[dataset]
    run_convert(dataset, src, tmp_path, splits=['train'])
    want = tree_bytes(tmp_path)
    run_convert(dataset, src, tmp_path, splits=['train'])  # the plan compares equal as stored
    assert tree_bytes(tmp_path) == want


def test_two_tasks_hold_exactly_the_scenes_of_one_run(tmp_path):
    src = make_nmr_copies(tmp_path / 'src', 20)
    run_convert('nmr', src, tmp_path / 'one', scenes_per_shard=3, splits=['train'])
    s0 = run_convert('nmr', src, tmp_path / 'two', scenes_per_shard=3, splits=['train'],
                     num_tasks=2, task_index=0)
    assert not s0['train']['finalized']
    assert not (tmp_path / 'two/train.manifest.json').exists()
    s1 = run_convert('nmr', src, tmp_path / 'two', scenes_per_shard=3, splits=['train'],
                     num_tasks=2, task_index=1)
    assert s1['train']['finalized']  # the last task merges manifest and index
    keys = lambda out: sorted(s['__key__'] for s in all_samples(out, 'train'))  # noqa: E731
    assert keys(tmp_path / 'two') == keys(tmp_path / 'one')
    assert len(keys(tmp_path / 'one')) == 20 == len(set(keys(tmp_path / 'one')))
    assert tree_bytes(tmp_path / 'two') == tree_bytes(tmp_path / 'one')


def test_task_environment_defaults(monkeypatch):
    from pipeline.convert import task_from_environment
    monkeypatch.setenv('SLURM_ARRAY_TASK_COUNT', '4')
    monkeypatch.setenv('SLURM_ARRAY_TASK_ID', '3')
    monkeypatch.setenv('SLURM_ARRAY_TASK_MIN', '1')
    assert task_from_environment() == (4, 2)
    for k in ('SLURM_ARRAY_TASK_COUNT', 'SLURM_ARRAY_TASK_ID', 'SLURM_ARRAY_TASK_MIN'):
        monkeypatch.delenv(k)
    monkeypatch.setenv('JOB_COMPLETION_INDEX', '1')
    with pytest.raises(ValueError, match='--num-tasks'):
        task_from_environment()
    monkeypatch.setenv('NUM_TASKS', '2')
    assert task_from_environment() == (2, 1)


def test_parallel_workers_give_the_same_bytes(tmp_path):
    src = make_nmr_copies(tmp_path / 'src', 12)
    run_convert('nmr', src, tmp_path / 'a', scenes_per_shard=2)
    run_convert('nmr', src, tmp_path / 'b', scenes_per_shard=2, workers=2)
    assert tree_bytes(tmp_path / 'a') == tree_bytes(tmp_path / 'b')


def test_other_schema_version_or_settings_are_refused(tmp_path):
    run_convert('nmr', SRC / 'nmr', tmp_path, splits=['val'])
    with pytest.raises(ConvertError, match='scenes_per_shard'):
        run_convert('nmr', SRC / 'nmr', tmp_path, splits=['val'], scenes_per_shard=1)
    manifest = tmp_path / 'val.manifest.json'
    data = json.loads(manifest.read_text())
    data['schema_version'] = 0
    manifest.write_text(json.dumps(data))
    with pytest.raises(ConvertError, match='schema version 0'):
        run_convert('nmr', SRC / 'nmr', tmp_path, splits=['val'])
    # The command line turns the library's error into a message and exit code 1.
    proc = cli('convert_nmr.py', '--src', SRC / 'nmr', '--out', tmp_path, '--splits', 'val',
               check=False)
    assert proc.returncode == 1 and 'schema version 0' in proc.stderr
    assert 'Traceback' not in proc.stderr


def test_baked_rays_equal_the_camera_rays(tmp_path):
    import io
    import zstandard
    run_convert('clevr3d', SRC / 'clevr3d', tmp_path, splits=['test'], bake_rays=True)
    sample = all_samples(tmp_path, 'test')[0]
    rays = np.load(io.BytesIO(zstandard.ZstdDecompressor().decompress(sample['rays.npy.zst'])))
    scene = Scene(sample)
    _, d = cameras.image_rays(scene.K, scene.c2w, 240, 320)
    assert rays.dtype == np.float32 and rays.shape == (3, 240, 320, 3)
    assert np.abs(rays - d).max() <= 1e-6


# ----------------------------------------------------------------------------- bad input

def _png(size):
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(buf, 'png')
    return buf.getvalue()


def _break_nmr(kind, src):
    scene = src / '02958343/val00001'
    if kind == 'undecodable_png':
        data = (scene / 'image/0003.png').read_bytes()
        (scene / 'image/0003.png').write_bytes(data[:len(data) // 2])
        return 'image/0003.png', 'undecodable PNG'
    if kind == 'missing_cameras':
        (scene / 'cameras.npz').unlink()
        return 'cameras.npz', 'missing cameras.npz'
    if kind == 'missing_view':
        (scene / 'image/0005.png').unlink()
        return 'image/0005.png', 'missing view image'
    if kind == 'nonfinite_camera':
        cams = dict(np.load(scene / 'cameras.npz'))
        cams['world_mat_inv_2'][0, 3] = np.nan
        np.savez(scene / 'cameras.npz', **cams)
        return 'cameras.npz', 'non-finite'
    if kind == 'wrong_size':
        (scene / 'image/0007.png').write_bytes(_png(32))
        return 'val00001', 'wrong image size 32x32'
    raise ValueError(kind)


@pytest.mark.parametrize('kind', ['undecodable_png', 'missing_cameras', 'missing_view',
                                  'nonfinite_camera', 'wrong_size'])
def test_bad_nmr_input_names_file_and_scene_and_leaves_no_shard(tmp_path, kind):
    src = make_nmr_copies(tmp_path / 'src', 0, n_val=4)
    where, message = _break_nmr(kind, src)
    out = tmp_path / 'out'
    proc = cli('convert_nmr.py', '--src', src, '--out', out, '--splits', 'val',
               '--scenes-per-shard', 2, check=False)
    assert proc.returncode == 1
    assert where in proc.stderr and message in proc.stderr and 'val00001' in proc.stderr
    assert not (out / 'val-000000.tar').exists()  # the shard holding the bad scene is not visible
    assert not (out / 'val.manifest.json').exists()
    proc = cli('convert_nmr.py', '--src', src, '--out', out, '--splits', 'val',
               '--scenes-per-shard', 2, '--skip-bad')
    assert '1 bad scenes skipped' in proc.stdout
    records = [json.loads(line) for line in (out / 'val.skipped.jsonl').read_text().splitlines()]
    assert len(records) == 1 and records[0]['source_ref'] == '02958343/val00001'
    assert message in records[0]['error']
    manifest = json.loads((out / 'val.manifest.json').read_text())
    assert manifest['num_scenes'] == 3 and manifest['num_skipped'] == 1
    assert verify(str(out), progress=False) == []


def test_truncated_tfrecord_names_file_and_record(tmp_path):
    src = tmp_path / 'msn'
    shutil.copytree(SRC / 'msn', src)
    path = src / 'multi_shapenet_frames/2.3.3/multi_shapenet_frames-train.tfrecord-00000-of-00001'
    os.chmod(path, 0o644)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 5000])  # the second record loses its end
    out = tmp_path / 'out'
    proc = cli('convert_msn.py', '--src', src, '--out', out, '--splits', 'train', check=False)
    assert proc.returncode == 1
    assert 'truncated TFRecord at record 1' in proc.stderr and path.name in proc.stderr
    assert not list(out.glob('*.tar'))
    proc = cli('convert_msn.py', '--src', src, '--out', out, '--splits', 'train', '--skip-bad')
    assert '1 bad scenes skipped' in proc.stdout
    assert json.loads((out / 'train.manifest.json').read_text())['num_scenes'] == 1


def test_nonfinite_obsurf_camera_is_named(tmp_path):
    src = tmp_path / 'clevr'
    shutil.copytree(SRC / 'clevr3d', src)
    md = dict(np.load(src / 'metadata.npz'))
    md['camera_pos'][85001, 1, 2] = np.inf
    os.chmod(src / 'metadata.npz', 0o644)
    np.savez(src / 'metadata.npz', **md)
    with pytest.raises(Exception, match='scene 85001 view 1.*non-finite'):
        run_convert('clevr3d', src, tmp_path / 'out', splits=['test'])


# ----------------------------------------------------------------------------- other readers

def test_plain_webdataset_reads_the_shards(tmp_path):
    import webdataset as wds
    run_convert('msn', SRC / 'msn', tmp_path, splits=['train'])
    ds = wds.WebDataset(shard_urls(str(tmp_path), 'train'), shardshuffle=False).decode('rgb8')
    samples = list(ds)
    assert sorted(s['__key__'] for s in samples) == ['msn_train_scene_7', 'msn_train_scene_8']
    for s in samples:
        assert s['rgb_000.png'].shape == (128, 128, 3)
        assert s['cameras.npz']['K'].shape == (10, 3, 3)
        assert s['meta.json']['num_views'] == 10


def _docs_reader():
    text = (ROOT / 'docs/SHARDS.md').read_text()
    code = text.split('<!-- reader:start -->')[1].split('<!-- reader:end -->')[0]
    code = code.split('```python')[1].split('```')[0]
    namespace = {}
    exec(compile(code, 'docs/SHARDS.md', 'exec'), namespace)
    return namespace, len(code.strip().splitlines())


def test_the_reader_in_docs_reads_scenes_and_rays(tmp_path):
    run_convert('nmr', SRC / 'nmr', tmp_path, splits=['train'])
    ns, lines = _docs_reader()
    assert lines <= 20
    ref = np.load(REF / 'nmr_train_item11_world.npz')  # scene00008, input view 5
    found = 0
    for url in shard_urls(str(tmp_path), 'train'):
        for key, meta, images, K, c2w in ns['scenes'](url):
            assert images.shape == (24, 64, 64, 3) and K.shape == (24, 3, 3)
            if meta['scene_id'] == '02958343/scene00008':
                o, d = ns['rays'](K[5], c2w[5], 64, 64)
                assert np.abs(d - ref['input_rays'][0]).max() <= 1e-5
                assert np.abs(o[0, 0] - ref['input_camera_pos'][0]).max() <= 1e-5
                found += 1
    assert found == 1


def test_hugging_face_datasets_loads_the_shards(tmp_path):
    import datasets
    run_convert('msn', SRC / 'msn', tmp_path / 'shards', splits=['train', 'test'])
    ds = datasets.load_dataset('webdataset', data_files={
        'train': shard_urls(str(tmp_path / 'shards'), 'train'),
        'test': shard_urls(str(tmp_path / 'shards'), 'test')}, cache_dir=str(tmp_path / 'hf'))
    assert ds['train'].num_rows == 2 and ds['test'].num_rows == 2
    row = ds['train'][0]
    assert row['rgb_000.png'].size == (128, 128)
    assert np.asarray(row['cameras.npz']['c2w']).shape == (10, 4, 4)
    assert row['meta.json']['pose_convention'] == 'c2w_opencv'


def test_readme_convert_and_inspect_commands(tmp_path):
    out = tmp_path / 'clevr3d'
    cli('convert_obsurf.py', '--src', SRC / 'clevr3d', '--out', out, '--splits', 'train')
    def inspect(*args):
        return subprocess.run([sys.executable, str(ROOT / 'tools/inspect_shards.py'), str(out),
                               *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    proc = inspect('--verify', '--contact-sheet', tmp_path / 'sheet.png', '--scenes', 2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'clevr3d' in proc.stdout and (tmp_path / 'sheet.png').stat().st_size > 0
    with open(out / 'train-000000.tar', 'r+b') as f:  # one flipped byte inside a PNG
        f.seek(3000)
        byte = f.read(1)
        f.seek(3000)
        f.write(bytes([byte[0] ^ 0xFF]))
    bad = inspect('--verify')
    assert bad.returncode != 0 and 'train-000000.tar' in bad.stdout + bad.stderr
