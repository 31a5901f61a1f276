"""Every sub-command explains itself with --help, and the package runs as `python -m columnformer`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from columnformer.cli import build_parser, main

COMMANDS = [name for name in build_parser()._subparsers._group_actions[0].choices]


def test_core_commands_are_registered():
    assert {"train", "resume", "eval", "presets", "sdm"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"columnformer {command}" in out and len(out.splitlines()) >= 3


def test_unknown_arguments_are_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["presets", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "columnformer", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "train" in out.stdout and "presets" in out.stdout
