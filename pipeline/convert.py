"""Source dataset -> WebDataset shards: planned, parallel, resumable, split across cluster tasks.

For each split the conversion is *planned* deterministically from the source alone (scene list in
the reference loader's order, scenes per shard), so every run and every task of a job array agrees
on which scene goes into which shard ``<split>-%06d.tar``. A shard is written under a hidden
temporary name in ``<out>/.work/``, its record (scene count, bytes, sha256, per-sample offsets) is
written next to it, then its member index ``<split>-%06d.idx`` (DALI's format, ``pipeline.tario``;
readers go to the members they need through it) and the tar are renamed into place: a ``.tar`` in
``<out>`` is always complete, and rerunning skips complete shards and redoes the rest. When every
shard of a split exists (after the last task, or with ``--finalize``), the split's manifest, LMDB
index, skipped-scene log, the source's own split files (e.g. an evaluation index) and the dataset
card are written. Output bytes depend only on the source and the settings.

Member sets: sources of SRT's datasets declare one member set per split (every scene has it, a scene
that differs is bad); the importers' sources (``fixed_members = False``) may hold scenes with other
view counts, and the manifest's ``members`` is then null.

Errors are exceptions (``ConvertError``, ``pipeline.schema.SourceError``, ``ValueError`` for
settings); the command line (``pipeline/cli.py``) turns them into messages and exit codes.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import time
from typing import Any

from tqdm import tqdm

from pipeline import splitstats, tario
from pipeline.durable import OutputError, atomic_write, output_error
from pipeline.schema import SCHEMA_VERSION, SourceError, encode_scene, json_bytes
from pipeline.sources import open_source

WORK_DIR = '.work'
DEFAULT_SHARD_BYTES = 256 * 2**20
_ESTIMATE_SCENES = 16


class ConvertError(RuntimeError):
    """A conversion that cannot go on as asked; the message names the file or directory (a missing
    source or split, output of another schema version or other settings, an incomplete split)."""


@dataclasses.dataclass
class ConvertConfig:
    dataset: str  # 'nmr' | 'clevr3d' | 'obsurf_msn' | 'msn', or any name with source_format
    src: str  # source dataset directory
    out: str  # output directory of the shards
    splits: list[str] | None = None  # None: every split the source has
    scenes_per_shard: int | None = None  # None: from shard_bytes and the first scenes' size
    shard_bytes: int = DEFAULT_SHARD_BYTES  # target shard size when scenes_per_shard is None
    workers: int = 1  # processes writing shards
    num_tasks: int = 1  # cluster job array size
    task_index: int = 0  # this task's index in [0, num_tasks)
    bake_rays: bool = False  # also store float32 ray directions (rays.npy.zst)
    skip_bad: bool = False  # record bad scenes in <split>.skipped.jsonl instead of stopping
    finalize_only: bool = False  # only merge complete shards into manifest/index/card
    source_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. max_objects
    progress: bool = True  # show tqdm bars
    source_format: str | None = None  # an importer's format ('pixelsplat', ...); None: by dataset

    def __post_init__(self):
        if not 0 <= self.task_index < self.num_tasks:
            raise ValueError(f'--task-index {self.task_index} is outside [0, --num-tasks '
                             f'{self.num_tasks})')
        if self.workers < 1:
            raise ValueError('--workers must be >= 1')
        if self.scenes_per_shard is not None and self.scenes_per_shard < 1:
            raise ValueError('--scenes-per-shard must be >= 1')


def task_from_environment() -> tuple[int, int]:
    """(num_tasks, task_index) from a SLURM job array or a Kubernetes indexed job, else (1, 0)."""
    env = os.environ
    if 'SLURM_ARRAY_TASK_COUNT' in env and 'SLURM_ARRAY_TASK_ID' in env:
        first = int(env.get('SLURM_ARRAY_TASK_MIN', 0))
        return int(env['SLURM_ARRAY_TASK_COUNT']), int(env['SLURM_ARRAY_TASK_ID']) - first
    if 'JOB_COMPLETION_INDEX' in env:
        count = env.get('JOB_COMPLETIONS') or env.get('NUM_TASKS')
        if count is None:
            raise ValueError('JOB_COMPLETION_INDEX is set (Kubernetes indexed job) but the job size '
                             'is unknown: pass --num-tasks (or set NUM_TASKS)')
        return int(count), int(env['JOB_COMPLETION_INDEX'])
    return 1, 0


def shard_name(split: str, index: int) -> str:
    return f'{split}-{index:06d}.tar'


def _atomic_write(path: str, data: bytes) -> None:
    atomic_write(path, data, os.path.basename(path))


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- planning

def _plan(cfg: ConvertConfig, source, split: str, refs: list) -> dict[str, Any]:
    """Scenes per shard and the member set of the split (null for sources whose scenes may
    differ), from the source alone (deterministic)."""
    spp, members, sample_bytes = cfg.scenes_per_shard, None, []
    for item in source.read(split, refs[:_ESTIMATE_SCENES], 0):
        if isinstance(item, SourceError):
            continue  # the shard writer reports it where it belongs
        try:
            key, encoded = encode_scene(item, cfg.bake_rays)
        except SourceError:
            continue
        members = members or [name[len(key) + 1:] for name, _ in encoded]
        sample_bytes.append(len(tario.encode_members(encoded)))
    if spp is None:
        mean = sum(sample_bytes) / len(sample_bytes) if sample_bytes else 1
        spp = max(1, int(cfg.shard_bytes // mean))
    return {
        'schema_version': SCHEMA_VERSION,
        'dataset': cfg.dataset,
        'split': split,
        'source': source.describe(),
        'bake_rays': cfg.bake_rays,
        'num_source_scenes': len(refs),
        'scenes_per_shard': spp,
        'num_shards': (len(refs) + spp - 1) // spp,
        'members': (members or []) if getattr(source, 'fixed_members', True) else None,
    }


def _check_versions(out: str) -> None:
    """Refuse an output directory holding any split (or plan) of another schema version."""
    work = os.path.join(out, WORK_DIR)
    paths = [os.path.join(out, f) for f in sorted(os.listdir(out)) if f.endswith('.manifest.json')]
    if os.path.isdir(work):
        paths += [os.path.join(work, f) for f in sorted(os.listdir(work)) if f.endswith('.plan.json')]
    for path in paths:
        version = _read_json(path).get('schema_version')
        if version != SCHEMA_VERSION:
            raise ConvertError(f'{path}: existing output has schema version {version}, this '
                               f'converter writes {SCHEMA_VERSION}; convert into a new --out '
                               'directory (or delete the old shards)')


def _check_existing(cfg: ConvertConfig, split: str, plan: dict) -> None:
    """Refuse to mix with output of another schema version or other settings."""
    _check_versions(cfg.out)
    path = os.path.join(cfg.out, WORK_DIR, f'{split}.plan.json')
    if os.path.exists(path):
        old = _read_json(path)
        plan = json.loads(json_bytes(plan))  # compare as stored (tuples become lists)
        if old != plan:
            diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
            raise ConvertError(f'{path}: existing output of split {split!r} was planned with other '
                             f'settings or source ({", ".join(diff)} differ); use another --out or '
                             'delete it')
    else:
        _atomic_write(path, json_bytes(plan))


# ----------------------------------------------------------------------------- shard writing

_worker_state: dict[str, Any] = {}


def _worker_init(counter) -> None:
    _worker_state['counter'] = counter


def _source_for(job: dict):
    key = (job['dataset'], job['src'], job['source_format'],
           json.dumps(job['source_kwargs'], sort_keys=True))
    if _worker_state.get('source_key') != key:
        _worker_state['source'] = open_source(job['dataset'], job['src'], job['source_format'],
                                              **job['source_kwargs'])
        _worker_state['source_key'] = key
    return _worker_state['source']


def _bad_scene(split: str, ref, index: int, err: Exception) -> dict[str, Any]:
    record = {'split': split, 'reference_index': index, 'source_ref': ref, 'error': str(err)}
    for name in ('scene_id', 'source_file'):  # where the reader named them (SourceError)
        if getattr(err, name, None) is not None:
            record[name] = getattr(err, name)
    return record


def write_shard(job: dict) -> dict[str, Any]:
    """Write one shard (runs in a worker process). Returns its record. A failing output (disk
    full, read-only...) raises OutputError and leaves no partial file behind."""
    name = shard_name(job['split'], job['index'])
    tmp = os.path.join(job['out'], WORK_DIR, f'{name}.partial')
    try:
        return _write_shard(job)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        named = (output_error(e, os.path.join(job['out'], name), f'shard {name}', job['out'])
                 if isinstance(e, OSError) else None)
        if named is not None and named is not e:
            raise named from e
        raise


def _write_shard(job: dict) -> dict[str, Any]:
    source = _source_for(job)
    split, start, refs = job['split'], job['start'], job['refs']
    name = shard_name(split, job['index'])
    work = os.path.join(job['out'], WORK_DIR)
    tmp = os.path.join(work, f'{name}.partial')
    counter = _worker_state.get('counter')
    sha, offset, samples, skipped, layouts = hashlib.sha256(), 0, [], [], []
    stats = splitstats.new_stats()
    with open(tmp, 'wb') as f:
        for i, item in enumerate(source.read(split, refs, start)):
            try:
                if isinstance(item, SourceError):
                    raise item
                key, members = encode_scene(item, job['bake_rays'])
                got = [n[len(key) + 1:] for n, _ in members]
                if job['members'] is not None and got != job['members']:
                    raise SourceError(f'{item.origin}: scene {item.scene_id} has members {got}, '
                                      f'but the split\'s scenes have {job["members"]}')
            except SourceError as e:
                if not job['skip_bad']:
                    raise
                skipped.append(_bad_scene(split, refs[i], start + i, e))
                continue
            splitstats.add_scene(stats, got, json.loads(members[0][1]))  # meta.json comes first
            buf = tario.encode_members(members)
            f.write(buf)
            sha.update(buf)
            samples.append([key, start + i, offset, len(buf)])
            layouts.append(tario.member_layout(members, offset))
            offset += len(buf)
            if counter is not None:
                with counter.get_lock():
                    counter.value += 1
        f.write(tario.END_OF_ARCHIVE)
        sha.update(tario.END_OF_ARCHIVE)
        f.flush()
        os.fsync(f.fileno())
    record = {'name': name, 'scenes': len(samples), 'bytes': offset + len(tario.END_OF_ARCHIVE),
              'sha256': sha.hexdigest(), 'samples': samples, 'skipped': skipped,
              'stats': stats, 'plan': job['plan_digest']}
    _atomic_write(os.path.join(work, f'{name}.json'), json_bytes(record))
    # The index before the tar, so that it is never older than the tar it describes.
    _atomic_write(tario.index_path(os.path.join(job['out'], name)),
                  tario.index_text(layouts).encode())
    os.replace(tmp, os.path.join(job['out'], name))
    return record


def _shard_record(out: str, name: str, plan_digest: str) -> dict | None:
    """The record of a complete shard, or None if it must be (re)written."""
    tar, rec = os.path.join(out, name), os.path.join(out, WORK_DIR, f'{name}.json')
    if not (os.path.exists(tar) and os.path.exists(rec)):
        return None
    record = _read_json(rec)
    if record.get('plan') != plan_digest or os.path.getsize(tar) != record['bytes']:
        return None
    return record


def _run_jobs(cfg: ConvertConfig, jobs: list[dict], total: int, desc: str) -> None:
    bar = tqdm(total=total, desc=desc, unit='scene', disable=not cfg.progress, smoothing=0.1)
    if cfg.workers == 1 or len(jobs) <= 1:
        counter = mp.Value('q', 0, lock=True)
        _worker_init(counter)
        for job in jobs:
            write_shard(job)
            bar.update(counter.value - bar.n)
        bar.close()
        return
    ctx = mp.get_context('spawn')  # TensorFlow state does not survive fork
    counter = ctx.Value('q', 0, lock=True)
    with cf.ProcessPoolExecutor(min(cfg.workers, len(jobs)), mp_context=ctx,
                                initializer=_worker_init, initargs=(counter,)) as pool:
        pending = {pool.submit(write_shard, job) for job in jobs}
        while pending:
            done, pending = cf.wait(pending, timeout=0.5, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                fut.result()  # re-raise a worker's error (the pool cancels the rest on exit)
            bar.update(counter.value - bar.n)
    bar.close()


# ----------------------------------------------------------------------------- finalising

def _finalize(cfg: ConvertConfig, split: str, plan: dict, source) -> dict[str, Any]:
    from pipeline import index as shard_index
    digest = hashlib.sha256(json_bytes(plan)).hexdigest()
    records, missing = [], []
    for i in range(plan['num_shards']):
        rec = _shard_record(cfg.out, shard_name(split, i), digest)
        (records.append(rec) if rec else missing.append(shard_name(split, i)))
    if missing:
        raise ConvertError(f'{cfg.out}: split {split!r} is incomplete: {len(missing)} of '
                         f'{plan["num_shards"]} shards missing ({", ".join(missing[:5])}'
                         f'{", ..." if len(missing) > 5 else ""}); run the remaining tasks first')
    skipped = [s for r in records for s in r['skipped']]
    merged = splitstats.new_stats()
    for r in records:
        splitstats.merge(merged, r['stats'])
    manifest = {
        'schema_version': SCHEMA_VERSION,
        'dataset': cfg.dataset,
        'split': split,
        'source': plan['source'],
        'scenes_per_shard': plan['scenes_per_shard'],
        'bake_rays': plan['bake_rays'],
        **splitstats.manifest_fields(merged, plan['members']),
        'num_scenes': sum(r['scenes'] for r in records),
        'num_skipped': len(skipped),
        'num_source_scenes': plan['num_source_scenes'],
        'bytes': sum(r['bytes'] for r in records),
        'shards': [{'name': r['name'], 'scenes': r['scenes'], 'bytes': r['bytes'],
                    'sha256': r['sha256']} for r in records],
    }
    if hasattr(source, 'num_filtered'):
        manifest['num_filtered_max_objects'] = source.num_filtered(split)
    skipped_path = os.path.join(cfg.out, f'{split}.skipped.jsonl')
    if skipped:
        _atomic_write(skipped_path, b''.join(json_bytes(s) + b'\n' for s in skipped))
    elif os.path.exists(skipped_path):
        os.remove(skipped_path)
    if hasattr(source, 'split_files'):  # e.g. <split>.evaluation_index.json, keyed by sample keys
        keys = [s[0] for r in records for s in r['samples']]
        for name, data in source.split_files(split, keys).items():
            _atomic_write(os.path.join(cfg.out, name), data)
    shard_index.build(cfg.out, split, records)
    _atomic_write(os.path.join(cfg.out, f'{split}.manifest.json'),
                  json.dumps(manifest, indent=1, sort_keys=True).encode() + b'\n')
    from pipeline.card import write_card
    write_card(cfg.out)
    return manifest


# ----------------------------------------------------------------------------- entry point

def convert(cfg: ConvertConfig) -> dict[str, dict]:
    """Convert (this task's part of) every requested split. Returns {split: summary}."""
    if not os.path.exists(cfg.src):
        raise ConvertError(f'{cfg.src}: source directory not found (pass --src)')
    try:
        os.makedirs(os.path.join(cfg.out, WORK_DIR), exist_ok=True)
    except OSError as e:
        raise output_error(e, cfg.out, 'the output directory') or e
    _check_versions(cfg.out)
    source = open_source(cfg.dataset, cfg.src, cfg.source_format, **cfg.source_kwargs)
    splits = cfg.splits or source.splits()
    unknown = [s for s in splits if s not in source.splits()]
    if unknown:
        raise ConvertError(f'{cfg.src}: no split(s) {unknown}; the source has {source.splits()}')
    summaries = {}
    for split in splits:
        t0 = time.perf_counter()
        refs = source.scene_refs(split)
        plan = _plan(cfg, source, split, refs)
        _check_existing(cfg, split, plan)
        digest = hashlib.sha256(json_bytes(plan)).hexdigest()
        spp = plan['scenes_per_shard']
        jobs, done_scenes = [], 0
        mine = range(cfg.task_index, plan['num_shards'], cfg.num_tasks)
        for i in ([] if cfg.finalize_only else mine):
            if _shard_record(cfg.out, shard_name(split, i), digest) is not None:
                continue
            jobs.append({'dataset': cfg.dataset, 'src': cfg.src, 'source_format': cfg.source_format,
                         'source_kwargs': cfg.source_kwargs,
                         'out': cfg.out, 'split': split, 'index': i, 'start': i * spp,
                         'refs': refs[i * spp:(i + 1) * spp], 'bake_rays': cfg.bake_rays,
                         'skip_bad': cfg.skip_bad, 'members': plan['members'],
                         'plan_digest': digest})
            done_scenes += len(jobs[-1]['refs'])
        _clean_partials(cfg.out, [shard_name(split, i) for i in mine])
        _run_jobs(cfg, jobs, done_scenes, f'{cfg.dataset} {split}')
        complete = all(_shard_record(cfg.out, shard_name(split, i), digest)
                       for i in range(plan['num_shards']))
        summary = {'split': split, 'scenes_converted': done_scenes, 'shards_written': len(jobs),
                   'seconds': time.perf_counter() - t0, 'finalized': False}
        if complete or cfg.finalize_only:
            manifest = _finalize(cfg, split, plan, source)
            summary.update(finalized=True, num_scenes=manifest['num_scenes'],
                           num_skipped=manifest['num_skipped'], bytes=manifest['bytes'],
                           num_shards=len(manifest['shards']))
        summaries[split] = summary
    return summaries


def _clean_partials(out: str, names: list[str]) -> None:
    """Remove the temporaries a killed run left for these shards (only this task's shards: tasks
    of a job array share the directory but never a shard)."""
    work = os.path.join(out, WORK_DIR)
    for entry in os.listdir(work):
        if any(entry == f'{n}.partial' or entry.startswith(f'{n}.json.tmp-') for n in names):
            try:
                os.remove(os.path.join(work, entry))
            except FileNotFoundError:
                pass
