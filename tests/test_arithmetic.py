"""The algorithmic probes (tasks/arithmetic.py): generators, splits, format, metrics, the sequence model."""

import json

import numpy as np
import pytest
import torch

from columnformer.config import ConfigError, build_config
from columnformer.tasks import build_task
from columnformer.tasks.arithmetic import ArithmeticConfig, build_arithmetic_sets


def _number(slots: np.ndarray, pad: int, base: int) -> tuple[int, int, int]:
    """(value, first used slot, digit count) of a least-significant-first slot row."""
    used = np.flatnonzero(slots != pad)
    digits = slots[used]
    assert np.all(np.diff(used) == 1), "an operand's digits are contiguous"
    return int(sum(int(d) * base**i for i, d in enumerate(digits))), int(used[0]), len(used)


def _decode(cfg: ArithmeticConfig, tokens: np.ndarray):
    w = cfg.width
    if cfg.layout == "line":
        a, op, b = tokens[:w], tokens[w], tokens[w + 1 :]
    else:
        a, op, b, tail = tokens[:w], tokens[w], tokens[w + 1 : 2 * w + 1], tokens[2 * w + 1]
        assert tail == cfg.pad
    return _number(a, cfg.pad, cfg.base), int(op), _number(b, cfg.pad, cfg.base)


def _cfg(**kw):
    base = dict(name="addition", train_size=600, val_size=200, test_size=200)
    return ArithmeticConfig(**{**base, **kw})


@pytest.mark.parametrize("name", ["addition", "multiplication", "switch"])
@pytest.mark.parametrize("layout", ["line", "grid"])
def test_examples_decode_to_correct_answers(name, layout):
    cfg = _cfg(name=name, layout=layout, base=7 if layout == "grid" else 10)
    inv_ops = {v: k for k, v in cfg.ops.items()}
    seen_ops = set()
    for split, ds in build_arithmetic_sets(cfg).items():
        for tok, tgt, n, op in zip(ds.tokens.numpy(), ds.target.numpy(), ds.length.tolist(), ds.op.tolist()):
            (a, sa, na), op_tok, (b, sb, nb) = _decode(cfg, tok)
            assert na == nb == n and sa == sb, "both operands have the example's length and start"
            if n > 1:  # exactly n significant digits
                assert cfg.base ** (n - 1) <= min(a, b)
            symbol = inv_ops[op_tok]
            seen_ops.add(symbol)
            assert symbol == "+-*"[op]
            expected = {"+": a + b, "-": a - b, "*": a * b}[symbol]
            value, start, count = _number(tgt, cfg.pad, cfg.base)
            assert value == expected and start == sa
            assert count == {"+": n + 1, "-": n, "*": 2 * n}[symbol]
            assert len(tgt) == cfg.out_len
    assert seen_ops == {"addition": {"+"}, "multiplication": {"*"}, "switch": {"+", "-"}}[name]


def test_switch_labels_follow_the_switch_token():
    """Flip the op token of switch examples: the target must be the other computation (both present)."""
    cfg = _cfg(name="switch")
    ds = build_arithmetic_sets(cfg)["test"]
    ops = ds.op.numpy()
    assert 0.3 < ops.mean() < 0.7  # both computations, in similar shares
    for tok, tgt, op in zip(ds.tokens.numpy(), ds.target.numpy(), ops):
        (a, _, _), _, (b, _, _) = _decode(cfg, tok)
        assert a >= b or op == 0  # subtraction orders its operands
        value = _number(tgt, cfg.pad, cfg.base)[0]
        assert value == (a - b if op == 1 else a + b)


def test_no_operand_pair_in_two_splits_and_ood_is_longer():
    cfg = _cfg(name="addition", train_size=4000, test_size=600, train_digits=2, max_digits=4, min_digits=1)
    sets = build_arithmetic_sets(cfg)
    pairs = {}
    for split, ds in sets.items():
        got = set()
        for tok in ds.tokens.numpy():
            (a, _, _), _, (b, _, _) = _decode(cfg, tok)
            got.add((min(a, b), max(a, b)))
        pairs[split] = got
    assert not pairs["train"] & pairs["test"] and not pairs["train"] & pairs["val"] and not pairs["val"] & pairs["test"]
    assert len(pairs["train"]) > 1000  # the check above is not vacuous
    assert sets["train"].length.max() <= cfg.train_digits and sets["val"].length.max() <= cfg.train_digits
    test_len = sets["test"].length
    assert (test_len <= 2).sum() == 600 and (test_len > 2).sum() == 600
    assert set(test_len[test_len > 2].tolist()) == {3, 4}  # every longer length, as digits (not leading zeros)
    assert set(sets["train"].length.tolist()) == {1, 2}


def test_random_offsets_fill_every_training_slot_only_when_on():
    on = build_arithmetic_sets(_cfg(random_offset=True))
    off = build_arithmetic_sets(_cfg(random_offset=False))
    w, L, pad = 6, 3, 10
    used_on = (on["train"].tokens[:, :w] != pad).any(0)
    used_off = (off["train"].tokens[:, :w] != pad).any(0)
    assert used_on.all()  # digits reach slots L..W-1 during training
    assert used_off[:L].all() and not used_off[L:].any()
    for ds in (on["val"], on["test"]):  # evaluation always starts at slot 0
        assert (ds.tokens[:, 0] != pad).all()


def test_sets_are_deterministic_and_seeded():
    a, b = build_arithmetic_sets(_cfg()), build_arithmetic_sets(_cfg())
    c = build_arithmetic_sets(_cfg(data_seed=1))
    assert torch.equal(a["train"].tokens, b["train"].tokens) and torch.equal(a["test"].target, b["test"].target)
    assert not torch.equal(a["train"].tokens, c["train"].tokens)


def test_config_errors_name_the_key():
    for raw, words in [
        ({"task": {"name": "addition", "max_digits": 2}}, "max_digits"),
        ({"task": {"name": "multiplication", "max_digits": 12}}, "overflow"),
        ({"task": {"name": "switch", "min_digits": 4}}, "min_digits"),
        ({"task": {"name": "addition", "digits": 4}}, "task.digits"),
    ]:
        with pytest.raises(ConfigError, match=words):
            build_config(raw)


def _model_cfg(shape, width=16, **sheet):
    return {
        "geometry": {"kind": "grid", "shape": shape}, "input_area": "all", "output_area": "all",
        "sheet": {"width": width, "steps": 2, "qk_dim": 8, **sheet},
    }


def test_sequence_model_shapes_and_mismatch_message():
    cfg = build_config({"task": {"name": "multiplication", "train_digits": 2}, "model": _model_cfg([1, 9])})
    task = build_task(cfg.task, cfg.model)
    model = task.build_model()
    batch = next(iter(torch.utils.data.DataLoader(task.datasets(cfg.data, cfg.model)["train"], batch_size=5)))
    logits, trace = task.forward(model, batch)
    assert logits.shape == (5, 8, 11) and len(trace.wiring) == 2
    bad = build_config({"task": {"name": "addition"}, "model": _model_cfg([2, 7])})  # grid layout size, line task
    with pytest.raises(ValueError, match=r"writes 13 tokens.*14 columns.*shape=\[1, 13\]"):
        build_task(bad.task, bad.model).build_model()
    with pytest.raises(ValueError, match="token ids must lie"):
        model(torch.full((1, 9), 99))


def test_metrics_count_exact_sequences_digits_and_lengths():
    cfg = build_config({"task": {"name": "switch", "train_digits": 1, "max_digits": 2}, "model": _model_cfg([1, 5])})
    task = build_task(cfg.task, cfg.model)
    target = torch.tensor([[3, 1, 10], [5, 10, 10], [0, 1, 1]])  # lengths 1, 1 (sub), 2
    length, op = torch.tensor([1, 1, 2]), torch.tensor([0, 1, 0])
    logits = torch.nn.functional.one_hot(target, 11).float()
    logits[2, 0] = torch.nn.functional.one_hot(torch.tensor(7), 11).float()  # one wrong digit in the long example
    batch = [None, target, length, op]
    sums = task.metric_sums(logits, batch)
    m = task.metrics(sums, 3)
    assert m["acc"] == pytest.approx(2 / 3) and m["acc_id"] == 1.0 and m["acc_ood"] == 0.0
    assert m["digit_acc"] == pytest.approx(5 / 6) and m["acc_len1"] == 1.0 and m["acc_len2"] == 0.0
    assert m["acc_add"] == 0.5 and m["acc_sub"] == 1.0
    perfect = torch.nn.functional.one_hot(target, 11).float() * 50
    assert task.loss(perfect, batch) < 0.01 < task.loss(torch.zeros_like(logits), batch)
    assert task.loss(perfect, batch, reduction="sum") < task.loss(logits * 50, batch, reduction="sum") / 10


def test_addition_trains_end_to_end(tmp_path):
    """A short CLI run: the generated data flow through the trainer, summary.json has OOD accuracy, eval works."""
    from columnformer.cli import main

    args = [
        "train", "task.name=addition", "task.train_digits=1", "task.max_digits=2", "task.train_size=512",
        "task.val_size=64", "task.test_size=64", "model.geometry.kind=grid", "model.geometry.shape=[1,5]",
        "model.input_area=all", "model.output_area=all", "model.sheet.width=16", "model.sheet.steps=2",
        "model.sheet.qk_dim=8", "train.epochs=3", "train.batch_size=32", "train.progress=false", "train.figures=false",
        "train.threads=1", "optim.lr=0.01", f"out_dir={tmp_path}", "name=add",
    ]
    assert main(args) == 0
    summary = json.loads((tmp_path / "add" / "summary.json").read_text())
    assert {"test_acc", "test_acc_id", "test_acc_ood", "test_acc_len2", "test_digit_acc"} <= set(summary)
    metrics = [json.loads(x) for x in (tmp_path / "add" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["task_loss"] for m in metrics if m["type"] == "step"]
    assert losses[-1] < 0.8 * losses[0]  # it learns


def test_analyze_draws_halting_and_expert_maps_of_a_sequence_run(tmp_path):
    """`columnformer analyze` on an addition run with ACT and a topographic weight bank: the halting steps and
    expert maps are measured (JSON, arrays) and drawn; the topography's classes are the operand lengths."""
    import numpy as np

    from columnformer.cli import main

    args = [
        "train", "task.name=addition", "task.train_digits=2", "task.max_digits=3", "task.train_size=128",
        "task.val_size=64", "task.test_size=32", "model.geometry.kind=grid", "model.geometry.shape=[1,7]",
        "model.input_area=all", "model.output_area=all", "model.sheet.width=16", "model.sheet.steps=3",
        "model.sheet.qk_dim=8", "model.sheet.halting=act", "model.sheet.mixture=topo", "model.sheet.experts=3",
        "train.epochs=1", "train.batch_size=32", "train.progress=false", "train.figures=false", "train.threads=1",
        f"out_dir={tmp_path}", "name=am",
    ]
    assert main(args) == 0
    lines = [json.loads(x) for x in (tmp_path / "am" / "metrics.jsonl").read_text().splitlines()]
    step = next(m for m in lines if m["type"] == "step")
    epoch = next(m for m in lines if m["type"] == "epoch")
    assert 0 <= step["mix_entropy"] <= np.log(3) + 1e-6 and 1 / 3 - 1e-6 <= step["expert_load_max"] <= 1
    assert 0 <= epoch["val_mix_entropy"] <= np.log(3) + 1e-6 and 1 <= epoch["val_ponder_steps"] <= 3
    assert main(["analyze", str(tmp_path / "am"), "--no-init", "--shuffles", "2"]) == 0
    data = json.loads((tmp_path / "am" / "analysis.json").read_text())
    halting, mixture = data["trained"]["halting"], data["trained"]["mixture"]
    assert 1 <= halting["min_column_steps"] <= halting["mean_steps"] <= halting["max_column_steps"] <= 3
    assert mixture["experts"] == 3 and sum(mixture["load"]) == pytest.approx(1.0, abs=1e-5)
    assert data["trained"]["topography"]["num_classes"] == 3  # operand lengths 1..3
    arrays = np.load(tmp_path / "am" / "analysis_arrays.npz")
    assert arrays["halt_steps"].shape == (7,) and arrays["expert_coef"].shape == (7, 3)
    figs = set(data["figures"])
    assert {"halting_steps.png", "expert_maps.png"} <= figs
    assert all((tmp_path / "am" / "figures" / "analysis" / f).is_file() for f in figs)


@pytest.mark.parametrize("sheet", [
    {"untied_attn": False, "untied_mlp": False, "untied_norm": False},
    {"recurrent": False},
    {"mixture": "dynamic", "experts": 2},
    {"halting": "ponder"},
])
@pytest.mark.parametrize("conn", [{"kind": "dense"}, {"kind": "local", "k": 4}])
def test_sequence_model_works_with_every_sheet_option(sheet, conn):
    """Tied/untied, recurrent/feed-forward, weight banks, halting, dense/sparse: tokens in, logits and gradients out."""
    model_cfg = _model_cfg([1, 5])
    model_cfg["sheet"].update(sheet)
    model_cfg["connectivity"] = conn
    cfg = build_config({"task": {"name": "addition", "train_digits": 1, "max_digits": 2}, "model": model_cfg})
    task = build_task(cfg.task, cfg.model)
    model = task.build_model()
    batch = next(iter(torch.utils.data.DataLoader(task.datasets(cfg.data, cfg.model)["train"], batch_size=4)))
    logits, trace = task.forward(model, batch)
    assert logits.shape == (4, 3, 11)
    (task.loss(logits, batch) + trace.aux_loss).backward()
    assert model.embed.weight.grad.abs().sum() > 0  # the gradient reaches the token embedding
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
