"""`columnformer sdm` under bad and extreme input (issue 15): a seeded grid of cases, in process.

Bad input exits 2 with one message that names the offending option and its valid range; extreme but valid
input (large n, r = 2^n beyond the float range, r small enough that p r underflows) exits 0 and prints only
finite numbers. Neither ever ends in a traceback.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from columnformer import cli

# (arguments after `sdm`, option the message must name, text of the valid range it must give)
BAD = [
    (["optimal-d", "--n", "1"], "--n", "[2, 10000]"),
    (["optimal-d", "--n", "10001"], "--n", "[2, 10000]"),
    (["optimal-d", "--r", "nan"], "--r", "finite number > 0"),
    (["optimal-d", "--r", "inf"], "--r", "finite number > 0"),
    (["optimal-d", "--r", "-5"], "--r", "finite number > 0"),
    (["optimal-d", "--r", "lots"], "--r", "finite number > 0"),
    (["optimal-d", "--m", "0"], "--m", "[1, "),
    (["optimal-d", "--d", "70"], "--d", "[0, --n = 64]"),
    (["optimal-d", "--d", "-1"], "--d", "[0, "),
    (["optimal-d", "--prob-whole-pattern", "1.5"], "--prob-whole-pattern", "(0, 1)"),
    (["optimal-d", "--prob-whole-pattern", "0"], "--prob-whole-pattern", "(0, 1)"),
    (["optimal-d", "--prob-whole-pattern", "nan"], "--prob-whole-pattern", "(0, 1)"),
    (["beta", "--d", "1"], "--d", "[2, "),
    (["beta", "--n", "3", "--d", "5"], "--d", "[2, --n = 3]"),
    (["beta", "--n", "2", "--d", "2", "--continuous"], "--n", "at least 3"),
    (["beta", "--d", "10", "--r", "0"], "--r", "finite number > 0"),
    (["beta", "--d", "10", "--n", "30000"], "--n", "[2, 20000]"),
    (["recall", "--n", "40"], "--p", ">= 7.47e-10"),  # the default p = 1e-13 is radius 0 at n = 40
    (["recall", "--neurons", "0"], "--neurons", "[1, "),
    (["recall", "--neurons", "100000000"], "--neurons", "at most 3,125,000"),
    (["recall", "--p", "0"], "--p", "(0, 1]"),
    (["recall", "--p", "2"], "--p", "(0, 1]"),
    (["recall", "--p", "nan"], "--p", "(0, 1]"),
    (["recall", "--algorithms", "nope"], "--algorithms", "sdm_attention"),
    (["recall", "--max-perturbation", "-1"], "--max-perturbation", "[0, "),
    (["recall", "--max-perturbation", "65"], "--max-perturbation", "[0, n = 64]"),
    (["recall", "--m", "0"], "--m", "[1, "),
    (["recall", "--queries", "0"], "--queries", "[1, "),
    (["recall", "--patterns", "{tmp}/missing.npy"], "--patterns", "existing .npy file"),
    (["recall", "--patterns", "{tmp}/flat.npy"], "--patterns", "2-D array"),
    (["recall", "--patterns", "{tmp}/nan.npy"], "--patterns", "finite numbers"),
    (["recall", "--continuous", "--n", "2", "--p", "0.9", "--max-perturbation", "1"], "--n", "at least 3"),
    (["projections", "--radii", "70"], "--radii", "[2, n = 64]"),
    (["projections", "--radii", "1"], "--radii", "[2, "),
    (["projections", "--cosines", "1.5"], "--cosines", "[-1, 1]"),
    (["projections", "--epochs", "0"], "--epochs", "[1, "),
    (["projections", "--resolution", "2"], "--resolution", "[3, "),
    (["learned-betas", "--n", "1"], "--n", "[2, 10000]"),
    (["critical-distance", "--r", "nan"], "--r", "finite number > 0"),
    (["critical-distance", "--n", "64", "20000"], "--n", "[2, 10000]"),
    (["effective-beta", "--n", "0"], "--n", "[2, 20000]"),
    (["effective-beta", "--m", "0"], "--m", "[1, "),
    (["effective-beta", "--num-images", "0"], "--num-images", "[1, "),
]

# extreme but valid: r = 2^n beyond the float range (n >= 1024), p r below it (n = 600, r = 1e6), large n
GOOD = [
    ["optimal-d", "--n", "1100"],
    ["optimal-d", "--n", "600", "--r", "1e6"],
    ["optimal-d", "--n", "1500", "--r", "1e12", "--d", "5", "600"],
    ["optimal-d", "--n", "2"],
    ["beta", "--n", "20000", "--d", "10"],
    ["beta", "--n", "5000", "--d", "1500", "--r", "1e12"],
    ["beta", "--n", "64", "--d", "11", "--continuous", "--r", "1e-3"],
    ["recall", "--n", "16", "--m", "8", "--queries", "4", "--max-perturbation", "1", "--p", "0.5",
     "--algorithms", "sdm_attention", "hopfield", "--out", "{tmp}/recall"],
    ["recall", "--continuous", "--n", "3", "--m", "4", "--queries", "2", "--max-perturbation", "1", "--p", "0.9",
     "--algorithms", "cap_sdm_inf", "cap_attention", "--resolution", "41", "--out", "{tmp}/recall3"],
    ["learned-betas", "--n", "100", "--m", "10", "--out", "{tmp}/learned"],
    ["critical-distance", "--n", "32", "300", "--m", "10", "--r", "all", "1e-3", "--out", "{tmp}/critical"],
    ["projections", "--n", "16", "--radii", "3", "--epochs", "1", "--queries", "8", "--cosines", "0.8",
     "--r", "1e3", "--resolution", "101", "--out", "{tmp}/projections"],
]
NON_FINITE = re.compile(r"\b(nan|inf|infinity)\b", re.IGNORECASE)


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = cli.main(["sdm", *args])
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    d = tmp_path_factory.mktemp("sdm_fuzz")
    np.save(d / "flat.npy", np.ones(8))
    np.save(d / "nan.npy", np.full((4, 8), np.nan))
    return d


@pytest.mark.parametrize("args,option,valid", BAD, ids=[" ".join(a) for a, *_ in BAD])
def test_bad_input_names_the_option_and_its_range(args, option, valid, tmp, capsys):
    code, out, err = _run([a.format(tmp=tmp) for a in args], capsys)
    assert code == 2, (code, err)
    assert "Traceback" not in err and out == ""
    last = err.strip().splitlines()[-1]
    assert option in last and valid in last, last


@pytest.mark.parametrize("args", GOOD, ids=[" ".join(a[:5]) for a in GOOD])
def test_extreme_valid_input_prints_finite_numbers(args, tmp, capsys):
    code, out, err = _run([a.format(tmp=tmp) for a in args], capsys)
    assert code == 0, err
    assert "Traceback" not in err and out.strip()
    assert not NON_FINITE.search(out), out
