"""Training and the shard tools must never need TensorFlow: importing the packages must not load it."""
import subprocess
import sys

from tests.conftest import ROOT


def _modules_after_import(code: str) -> set:
    out = subprocess.run([sys.executable, '-c', code + '\nimport sys; print(" ".join(sys.modules))'],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_importing_packages_does_not_import_tensorflow():
    mods = _modules_after_import('import pipeline, srt, pipeline.cameras')
    assert 'pipeline' in mods and 'srt' in mods
    assert not any(m == 'tensorflow' or m.startswith('tensorflow.') for m in mods)
