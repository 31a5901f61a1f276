"""Writes tests/expected/classify_digits.json: the metrics of a short `classify` digits run.

Made once, before the task-layer refactor (issue 10), from the code of the commit that adds it;
tests/test_tasks.py checks that today's `classify` task reproduces it. Do not regenerate it to make
a test pass: a difference means the refactor changed training.

    .venv/bin/python tests/expected/make_classify_digits.py
"""

import json
import sys
import tempfile
from pathlib import Path

from columnformer.config import build_config
from columnformer.train import train

ARGS = [
    "preset=digits", "model.sheet.width=16", "model.sheet.qk_dim=8", "model.sheet.steps=2",
    "train.epochs=2", "train.batch_size=32", "train.threads=1", "train.progress=false",
    "train.log_every=5", "train.ckpt_every=4", "train.wiring_lambda=0.01", "optim.lr=0.01", "optim.accum_steps=2",
    "train.label_smoothing=0.1", "name=expect",
]
SUMMARY_KEYS = ("steps", "best_val_acc", "test_acc", "test_loss", "test_wiring_cost", "test_attn_entropy", "best_val_test_acc")

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        summary = train(build_config({}, [*ARGS, f"out_dir={tmp}"]))
        lines = [json.loads(x) for x in (Path(tmp) / "expect" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    metrics = [{k: v for k, v in m.items() if k != "samples_per_s"} for m in lines]
    out = {"args": ARGS, "metrics": metrics, "summary": {k: summary[k] for k in SUMMARY_KEYS}}
    path = Path(__file__).with_name("classify_digits.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)
