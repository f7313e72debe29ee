#!/usr/bin/env python
"""MSN converter throughput per core beside the raw scan rate of the same TFRecords, in one run.

    python tools/bench_convert.py [--src DIR] [--scenes 300] [--workdir /tmp/srt_bench_convert]

Rows (rates are scenes per CPU second of the process, i.e. per core, TensorFlow's threads included):
  raw scan (tf.data)   tf.data.TFRecordDataset over the split's files: every record read, none
                       parsed (the standard way to scan TFRecords)
  raw scan (framing)   the converter's own record framing reader, reading every record
  read + sha256 + write + fsync (floor)
                       what any converter that records a sha256 of its output and writes it
                       durably must do, on the same bytes without parsing: the ceiling of the
                       converter row
  converter            tools/convert_msn.py's work for the split, one process: records read and
                       parsed, PNG chunk CRCs checked, cameras converted, deterministic tar written,
                       sha256, manifest and index
Also: shard bytes / source TFRecord bytes, and the tar-writing stage measured against Python's
tarfile (which WebDataset's TarWriter uses) on the same members.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')


def cpu_rate(fn, repeat: int = 3) -> float:
    """Best of ``repeat``: items per CPU second of fn() -> items."""
    best = 0.0
    for _ in range(repeat):
        t = time.process_time()
        n = fn()
        if isinstance(n, tuple):  # (items, CPU seconds fn timed itself)
            n, seconds = n
        else:
            seconds = time.process_time() - t
        best = max(best, n / seconds)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('--src', help='an MSN TFDS directory (default: generate one)')
    p.add_argument('--scenes', type=int, default=1000, help='scenes to generate without --src')
    p.add_argument('--workdir', default='/tmp/srt_bench_convert1k')
    args = p.parse_args(argv)
    src = args.src or os.path.join(args.workdir, 'msn_src')
    if not args.src and not os.path.isdir(src):
        subprocess.run([sys.executable, os.path.join(ROOT, 'tools/make_synthetic.py'), '--format',
                        'msn', '--out', src, '--scenes', str(args.scenes)], check=True)

    from pipeline.sources.msn import import_tensorflow
    tf = import_tensorflow()
    from pipeline import tario
    from pipeline.convert import ConvertConfig, convert
    from pipeline.sources.msn import MSNSource, TFRecordFile, find_dataset_dir
    source = MSNSource(src)
    split = 'train'
    files = source._files[split]
    n = sum(source._lengths[split])
    src_bytes = sum(os.path.getsize(f) for f in files)

    def tf_scan():
        return sum(1 for _ in tf.data.TFRecordDataset(files).as_numpy_iterator())

    def framing_scan():
        count = 0
        for f in files:
            r = TFRecordFile(f)
            for _ in range(source._lengths[split][files.index(f)]):
                r.read()
                count += 1
            r.close()
        return count

    out = os.path.join(args.workdir, 'shards')

    def copy_hash_sync():
        """What any converter that checksums and durably writes the bytes must do: read each record,
        sha256 it, write it and fsync the file (no parsing, no tar)."""
        count = 0
        with open(os.path.join(args.workdir, 'copy.bin'), 'wb') as dst:
            sha = hashlib.sha256()
            for f in files:
                r = TFRecordFile(f)
                for _ in range(source._lengths[split][files.index(f)]):
                    record = r.read()
                    sha.update(record)
                    dst.write(record)
                    count += 1
                r.close()
            dst.flush()
            os.fsync(dst.fileno())
        os.unlink(dst.name)
        return count

    def convert_once():
        shutil.rmtree(out, ignore_errors=True)  # outside the timed part (cpu_rate times fn only)
        t = time.process_time()
        convert(ConvertConfig(dataset='msn', src=src, out=out, splits=[split], progress=False))
        return n, time.process_time() - t

    rates = {'raw scan (tf.data)': cpu_rate(tf_scan), 'raw scan (framing)': cpu_rate(framing_scan),
             'read + sha256 + write + fsync (floor)': cpu_rate(copy_hash_sync),
             'converter': cpu_rate(convert_once)}
    shard_bytes = sum(os.path.getsize(f) for f in glob.glob(os.path.join(out, f'{split}-*.tar')))

    # The tar stage: Python's tarfile against pipeline.tario on the members of 100 scenes.
    from pipeline.schema import encode_scene
    scenes = [encode_scene(s)[1] for s in source.read(split, source.scene_refs(split)[:100], 0)]
    members = sum(len(m) for m in scenes)

    def with_tarfile():
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode='w', format=tarfile.USTAR_FORMAT) as tar:
            for sample in scenes:
                for name, data in sample:
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
        return members

    def with_tario():
        b''.join(tario.encode_members(sample) for sample in scenes)
        return members

    tar_rates = {'tarfile': cpu_rate(with_tarfile), 'pipeline.tario': cpu_rate(with_tario)}
    print(f'{n} MSN scenes ({find_dataset_dir(src)}), {src_bytes / 2**20:.1f} MiB of TFRecords, '
          f'{src_bytes / n / 1024:.0f} KiB per scene')
    print('| stage | scenes/s per core | vs raw scan (tf.data) |')
    print('|---|---|---|')
    for k, v in rates.items():
        print(f'| {k} | {v:,.0f} | {v / rates["raw scan (tf.data)"]:.2f}x |')
    print(f'\nshard bytes / source bytes: {shard_bytes / src_bytes:.3f} '
          f'({shard_bytes / 2**20:.1f} MiB / {src_bytes / 2**20:.1f} MiB)')
    print(f'tar writing, {members} members of 100 scenes: tarfile {tar_rates["tarfile"]:,.0f} '
          f'members/s, pipeline.tario {tar_rates["pipeline.tario"]:,.0f} members/s '
          f'({tar_rates["pipeline.tario"] / tar_rates["tarfile"]:.1f}x)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
