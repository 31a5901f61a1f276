"""The ``sdm`` command line (standalone ``python -m columnformer.sdm`` parser)."""

import argparse

import pytest

from columnformer.sdm import cli
from columnformer.sdm.__main__ import main


def test_beta_command(capsys):
    assert main(["beta", "--n", "64", "--d", "11"]) == 0
    out = capsys.readouterr().out
    assert "15.8528" in out and "14.4116" in out


def test_bad_input_is_a_clear_error(capsys):
    assert main(["beta", "--n", "64", "--d", "70"]) == 2
    assert "--d must be a Hamming radius in [2, --n = 64], got 70" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["beta", "--n", "64", "--d", "5", "--r", "lots"])


def test_optimal_d_command(capsys):
    assert main(["optimal-d", "--n", "64", "--m", "1024", "--d", "5"]) == 0
    out = capsys.readouterr().out
    assert "-> d=11" in out and "capacity-optimal:   d=5" in out and "d=5: critical distance 10" in out


def test_recall_command(tmp_path, capsys):
    rc = main(["recall", "--m", "64", "--queries", "16", "--max-perturbation", "2", "--p", "1e-13", "1e-3",
               "--algorithms", "neuron_sdm", "sdm_attention", "--neurons", "5000", "--out", str(tmp_path)])
    assert rc == 0
    captured = capsys.readouterr()
    assert "skipped neuron_sdm d=5" in captured.err
    assert (tmp_path / "recall.png").exists() and (tmp_path / "recall.csv").exists()
    assert "| sdm_attention | 20 |" in captured.out


def test_effective_beta_needs_a_source(capsys):
    assert main(["effective-beta"]) == 2
    assert "RUN_DIR or --pretrained minilm" in capsys.readouterr().err


def test_register_into_another_parser():
    parser = argparse.ArgumentParser(prog="columnformer")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["sdm", "beta", "--d", "5"])
    assert args.func(args) == 0
