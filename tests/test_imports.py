"""Importing any module never loads TensorFlow (only opening an MSN source does), and the layers
hold at run time: pipeline loads neither srt nor tools, srt never loads tools, srt.model never loads
pipeline. Every module of pipeline/ and srt/ and every tools/*.py is found by walking the tree, so a
new or renamed module is covered without editing this test."""
import json
import subprocess
import sys

from tests.conftest import ROOT

# Entry modules the README and the issue name: discovery must find them (it cannot silently find
# nothing).
MUST_FIND = {'pipeline.convert', 'pipeline.stream', 'pipeline.cli', 'srt.train', 'srt.evaluate',
             'srt.render', 'srt.cli', 'srt.demo', 'tools.convert_msn', 'tools.convert_nmr',
             'tools.convert_obsurf', 'tools.demo', 'tools.inspect_shards', 'tools.make_synthetic',
             'tools.render_video'}

# Runs in one fresh interpreter: the third-party dependencies load once (checked free of
# TensorFlow), then a forked child per module imports that module, with no module of the project
# loaded before it, and reports what the import loaded. (A fresh interpreter per module would cost
# a torch import each: minutes on 2 cores.)
CHILD = r'''
import importlib, importlib.util, json, os, sys
modules = json.loads(sys.stdin.read())
import numpy, torch, torchvision, PIL.Image, yaml, tqdm, webdataset
def top(m):
    return m.split('.')[0]
base = set(sys.modules)
assert not any(top(m).startswith('tensorflow') or top(m) in ('pipeline', 'srt', 'tools')
               for m in base), sorted(base)
results = {}
for name, path in modules:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            if path is None:
                importlib.import_module(name)
            else:  # tools/ is not a package: load the script as module `name`
                spec = importlib.util.spec_from_file_location(name, path)
                mod = importlib.util.module_from_spec(spec)
                sys.modules[name] = mod
                spec.loader.exec_module(mod)
            report = {'loaded': sorted(m for m in set(sys.modules) - base
                                       if top(m).startswith('tensorflow')
                                       or top(m) in ('pipeline', 'srt', 'tools'))}
        except BaseException as e:
            report = {'error': f'{type(e).__name__}: {e}'}
        os.write(w, json.dumps(report).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, 'rb') as f:
        data = f.read()
    os.waitpid(pid, 0)
    results[name] = json.loads(data) if data else {'error': 'the child died'}
print(json.dumps(results))
'''


def project_modules() -> list:
    """[(module name, file or None)] of every module of pipeline/ and srt/, and every tools/*.py
    (as ``tools.<name>``, loaded from its file)."""
    out = []
    for package in ('pipeline', 'srt'):
        for path in sorted((ROOT / package).rglob('*.py')):
            parts = path.relative_to(ROOT).with_suffix('').parts
            out.append(('.'.join(parts[:-1] if parts[-1] == '__init__' else parts), None))
    out += [(f'tools.{path.stem}', str(path)) for path in sorted((ROOT / 'tools').glob('*.py'))]
    return out


def _forbidden(name: str, loaded: list) -> list:
    tops = {m: m.split('.')[0] for m in loaded}
    bad = [m for m, t in tops.items() if t.startswith('tensorflow')]
    if name.startswith('pipeline'):
        bad += [m for m, t in tops.items() if t in ('srt', 'tools')]
    if name.startswith('srt'):
        bad += [m for m, t in tops.items() if t == 'tools']
    if name == 'srt.model' or name.startswith('srt.model.'):
        bad += [m for m, t in tops.items() if t == 'pipeline']
    return bad


def test_every_module_imports_without_tensorflow_and_within_its_layer():
    modules = project_modules()
    names = {name for name, _ in modules}
    assert MUST_FIND <= names, sorted(MUST_FIND - names)
    proc = subprocess.run([sys.executable, '-c', CHILD], input=json.dumps(modules), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    assert set(results) == names
    errors = {n: r['error'] for n, r in results.items() if 'error' in r}
    assert not errors, errors
    bad = {n: _forbidden(n, r['loaded']) for n, r in results.items() if _forbidden(n, r['loaded'])}
    assert not bad, bad


def test_the_layer_check_would_catch_tensorflow_and_a_layer_breach():
    # The check above could pass by checking nothing: it must flag what it is there to flag.
    assert _forbidden('srt.train', ['srt.train', 'tensorflow', 'tensorflow.python']) == \
        ['tensorflow', 'tensorflow.python']
    assert _forbidden('pipeline.stream', ['pipeline.stream', 'srt.data']) == ['srt.data']
    assert _forbidden('srt.model.core', ['srt.model.core', 'pipeline.cameras']) == \
        ['pipeline.cameras']
    assert _forbidden('srt.cli', ['srt.cli', 'pipeline.cli']) == []


def test_tensorflow_then_pytorch_optimizer_in_one_process():
    # TensorFlow and Triton both bundle LLVM: loading TensorFlow first and Triton after (Adam and
    # torch.compile load it) segfaulted the test process. The MSN reader's import avoids that.
    code = ('from pipeline.sources.msn import import_tensorflow; import_tensorflow()\n'
            'import torch; torch.optim.Adam([torch.zeros(1, requires_grad=True)]).step()\n'
            'print("alive")')
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and 'alive' in out.stdout, out.stderr[-2000:]
