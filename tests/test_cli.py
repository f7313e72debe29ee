"""The console script (`srt-shards`, srt/cli.py) and the data tools' command lines
(pipeline/cli.py).

The pip-installed check (a fresh venv, `pip install .`, every script's --help from outside the
checkout) is manual: README "Installing with pip". These tests call the entry points in-process.
"""
import configparser
import importlib
import subprocess
import sys

import pytest

from pipeline.cli import CONVERTERS, EXPORTERS, convert_main, inspect_main
from srt.cli import COMMANDS, main
from tests.conftest import ROOT


def console_scripts() -> dict:
    """{script name: 'module:function'} from setup.cfg."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / 'setup.cfg')
    lines = cfg['options.entry_points']['console_scripts'].strip().splitlines()
    return dict((s.strip() for s in line.split('=', 1)) for line in lines)


def help_text(fn, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        fn(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_every_console_script_answers_help(capsys):
    scripts = console_scripts()
    assert 'srt-shards' in scripts
    for name, target in scripts.items():
        module, function = target.split(':')
        out = help_text(getattr(importlib.import_module(module), function), ['--help'], capsys)
        assert out.startswith(f'usage: {name}'), out
        for command in COMMANDS:
            assert command in out


@pytest.mark.parametrize('argv', [[c] for c in COMMANDS] + [['convert', f] for f in CONVERTERS]
                         + [['export', f] for f in EXPORTERS])
def test_every_subcommand_answers_help_under_its_name(argv, capsys):
    argv0 = sys.argv[0]
    out = help_text(main, [*argv, '--help'], capsys)
    assert out.startswith(f'usage: srt-shards {" ".join(argv)} '), out
    assert sys.argv[0] == argv0  # the dispatcher's naming of the train/evaluate/render parsers


def test_unknown_subcommand_or_format_is_a_usage_error(capsys):
    for argv, says in ((['bogus'], "invalid choice: 'bogus'"),
                       (['convert', 'bogus'], "invalid choice: 'bogus'"),
                       ([], 'the following arguments are required: subcommand')):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert says in capsys.readouterr().err


def test_data_tool_errors_are_messages_and_exit_codes(tmp_path, capsys):
    missing = tmp_path / 'missing'
    assert convert_main(['nmr', '--src', str(missing), '--out', str(tmp_path / 'out')]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f'error: {missing}: source directory not found')
    assert 'Traceback' not in err
    assert not (tmp_path / 'out').exists()  # nothing written for a source that is not there
    assert inspect_main([str(missing)]) == 1
    assert str(missing) in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # a setting: named like argparse's own errors
        convert_main(['nmr', '--src', str(tmp_path), '--workers', '0'])
    assert exit_info.value.code == 2 and '--workers must be >= 1' in capsys.readouterr().err


def test_the_command_line_modules_load_neither_numpy_nor_torch():
    # make-synthetic sets OPENBLAS_NUM_THREADS before numpy loads (it must not load earlier), and
    # `srt-shards --help` answers without loading PyTorch.
    code = 'import sys, srt.cli, pipeline.cli; print(sorted({"numpy", "torch"} & set(sys.modules)))'
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == '[]'
