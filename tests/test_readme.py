"""The README cannot rot: its Python blocks run, its shell commands parse with the CLI (configs validated)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from columnformer.cli import build_parser
from columnformer.config import load_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _commands() -> list[str]:
    """Every shell command line of the README's bash blocks (continuations joined, comments dropped)."""
    out = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def _columnformer_argv(line: str) -> list[str] | None:
    """The arguments after ``columnformer`` / ``.venv/bin/columnformer`` / ``-m columnformer``, or None."""
    words = shlex.split(line)
    for i, w in enumerate(words):
        if (w == "columnformer" and (i == 0 or words[i - 1] == "-m")) or w.endswith("/columnformer"):
            return words[i + 1:]
    return None


def test_readme_has_the_blocks_this_test_reads():
    assert len(_blocks("python")) >= 1 and len(_commands()) >= 20


@pytest.mark.parametrize("line", _commands())
def test_readme_shell_command_parses(line):
    argv = _columnformer_argv(line)
    if argv is None:  # bash scripts/...: the script exists
        words = shlex.split(line)
        assert words[0] == "bash" and (ROOT / words[1]).is_file(), line
        return
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as exc:  # argparse rejected it (or printed --help, which exits 0)
        if exc.code == 0 and "--help" in argv:
            return
        pytest.fail(f"README command does not parse ({exc.code}): {line}")
    overrides = [*getattr(args, "overrides", []), *extra]
    assert all("=" in o for o in overrides), f"unrecognised arguments in README command: {line}"
    if args.command == "train":
        config = getattr(args, "config", None)
        if config is None or (ROOT / config).is_file():  # a user's own file (my_imagenet100.yaml) cannot be checked
            load_config(ROOT / config if config else None, overrides)  # raises ConfigError on a bad key or value


def test_readme_python_block_runs(tmp_path):
    from columnformer.config import build_config
    from columnformer.train import train

    train(build_config({"preset": "digits"}, [f"out_dir={tmp_path / 'runs'}", "name=digits", "train.max_steps=2",
                                              "train.epochs=1", "train.progress=false", "train.figures=false"]))
    code = "\n".join(_blocks("python"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
