"""The scale rehearsal runs end to end at toy size and prints its table and formulae (the numbers
at a million scenes are measured by hand and quoted in docs/REMOTE.md; no timing is asserted)."""
import subprocess
import sys

from tests.conftest import ROOT


def test_bench_scale_prints_its_rows_and_formulae(tmp_path):
    proc = subprocess.run([sys.executable, 'tools/bench_scale.py', '--scenes', '2000', '--shards',
                           '16', '--ranks', '4', '--workers', '2', '--num-tasks', '3',
                           '--lookups', '200', '--workdir', str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for name in ('manifest read + shard table', 'deal 16 shards to 4 ranks x 2 workers',
                 'elastic re-deal', 'merged stream state', 'index build',
                 'random lookup by key', 'stream state_dict per rank (W=2)',
                 'converter: shards per task (T=3)', 'formulae'):
        assert name in out, name
    assert '500 / 500' in out  # 2,000 scenes in 16 shards of 125, dealt evenly to 4 ranks
    assert 'shards 0, 3, ... 15 (6)' in out and 'shards 2, 5, ... 14 (5)' in out
    assert (tmp_path / 'train.index.lmdb').exists()
