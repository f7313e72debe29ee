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


def test_tensorflow_then_pytorch_optimizer_in_one_process():
    # TensorFlow and Triton both bundle LLVM: loading TensorFlow first and Triton after (Adam and
    # torch.compile load it) segfaulted the test process. The MSN reader's import avoids that.
    code = ('from pipeline.sources.msn import import_tensorflow; import_tensorflow()\n'
            'import torch; torch.optim.Adam([torch.zeros(1, requires_grad=True)]).step()\n'
            'print("alive")')
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and 'alive' in out.stdout, out.stderr[-2000:]
