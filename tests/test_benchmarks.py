"""The benchmark tools run end to end at toy size and print their tables (the numbers themselves are
measured on a quiet machine and quoted in the README; no timing is asserted here)."""
import subprocess
import sys

from tests.conftest import ROOT


def run_tool(*args):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_bench_loader_prints_its_table(tmp_path):
    out = run_tool('tools/bench_loader.py', '--workdir', tmp_path, '--scenes', 12, '--seconds',
                   0.2, '--sets', 'msn', 'nmr', 're10k', '--frames', 8)
    rows = [line for line in out.splitlines() if line.split(' ')[:2] in
            (['|', 'msn'], ['|', 'nmr'], ['|', 're10k'])]
    assert len(rows) == 3 and all(line.count('|') == 12 for line in rows)


def test_bench_floor_prints_its_rows(tmp_path):
    out = run_tool('tools/bench_floor.py', '--workdir', tmp_path, '--scenes', 3, '--frames', 8,
                   '--seconds', 0.2)
    rows = {line.split('|')[1].strip(): float(line.split('|')[2]) for line in out.splitlines()
            if line.count('|') == 4 and line.split('|')[2].strip()[:1].isdigit()}
    assert set(rows) == {'decode only', 'floor', 'floor + Scene', 'ours'} and min(rows.values()) > 0


def test_bench_convert_prints_its_ratios(tmp_path):
    out = run_tool('tools/bench_convert.py', '--workdir', tmp_path, '--scenes', 12)
    assert 'raw scan' in out and 'shard bytes / source bytes' in out


def test_bench_export_prints_its_ratios(shards_of, tmp_path):
    out = run_tool('tools/bench_export.py', '--shards', shards_of('clevr3d'), '--workdir', tmp_path)
    assert 'x floor' in out and 'nerfstudio' in out and 'JPEG PSNR' in out
