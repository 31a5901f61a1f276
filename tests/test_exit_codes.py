"""One exit-code convention for every sub-command: 2 bad input, 1 runtime failure, 3 divergence, one line each."""

from __future__ import annotations

import pytest

from columnformer import cli


def _boom(exc):
    def raiser(*_a, **_k):
        raise exc

    return raiser


@pytest.mark.parametrize("exc,code", [
    (PermissionError(13, "Permission denied", "runs/x/metrics.jsonl"), 1),  # a read-only run location
    (MemoryError("out of memory"), 1),
    (RuntimeError("DataLoader worker exited unexpectedly"), 1),
    (FileNotFoundError(2, "No such file or directory", "missing.pt"), 2),
    (ValueError("images have shape (1, 2), expected (B, 1, 8, 8)"), 2),
])
def test_exceptions_map_to_the_documented_exit_codes(monkeypatch, capsys, exc, code):
    import columnformer.train as train_mod

    monkeypatch.setattr(train_mod, "train", _boom(exc))
    assert cli.main(["train", "train.max_steps=1"]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and str(exc.args[-1]) in err


def test_config_errors_and_divergence_codes(capsys):
    assert cli.main(["train", "model.sheet.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
    assert (cli.EXIT_INPUT, cli.EXIT_RUNTIME, cli.EXIT_DIVERGED) == (2, 1, 3)
