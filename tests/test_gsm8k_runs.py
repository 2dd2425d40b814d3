"""Every method's GSM8K recipe, shrunk with `--set` to a tiny model and a few dozen steps,
with length grouping and packing on (Coconut and CODI, whose latent passes are sequential,
refuse packing: grouping only): it trains, evaluates, and a run stopped part way and
resumed ends with the same weights, `best/` and metrics as one that was not stopped. The
stopped run builds its rows in two DataLoader workers (`rim.pipeline`), the reference on the
main thread: the rows, and the cursor a checkpoint records, do not depend on the loader.

The recipes are the shipped `configs/gsm8k/gpt2_<method>.yaml` (LoRA settings, schedules,
method knobs), on the first 32 GSM8K-Aug-format lines of `train_no_aug.txt`; only sizes,
budgets and the batching options are overridden.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import Crash, rim_main

METHODS = ("direct", "cot", "rim", "pause", "coconut", "icot", "codi")
ROOT = Path(__file__).resolve().parents[1]

SIZE = [  # every recipe: a tiny GPT-2 from config, CPU, grouped and packed batches
    "model.path=null", "model.size=tiny", "model.tokenizer=null", "train.mixed_precision=no",
    "train.batch_size=8", "train.micro_batch_size=4", "train.group_by_length=true",
    "train.pack_tokens=512", "train.save_every=3", "train.keep_last=10", "train.eval_every=6",
    "train.log_every=1", "train.dropout=0.1", "train.threads=1", "eval.val_limit=4",
    "eval.batch_size=4", "eval.max_new_tokens=6", "eval.cot_max_new_tokens=24",
    "data.train.limit=32", "data.valid.limit=4", "data.test.limit=4",
]  # fmt: skip
BUDGET = {  # 4 steps per epoch (32 examples / 8)
    "direct": ["train.epochs=3"],
    "cot": ["train.epochs=3"],
    "pause": ["train.epochs=3"],
    "rim": ["curriculum.stage1_epochs=2", "curriculum.stage2_epochs=1"],
    # sequential latent passes: one example per row (packing is refused in one line), grouped
    "coconut": [
        "coconut.epochs_per_stage=1",
        "coconut.max_stage=2",
        "coconut.epochs=4",
        "train.pack_tokens=null",
    ],
    "icot": ["train.epochs=3", "icot.remove_per_epoch=4"],
    "codi": ["train.epochs=3", "train.micro_batch_size=8", "train.pack_tokens=null"],
}


def _sets(method: str, data: Path) -> list[str]:
    paths = [
        f"data.train.path={data}/gsm8k_aug/train_no_aug.txt",
        f"data.valid.path={data}/gsm8k_aug/valid.txt",
        f"data.test.path={data}/gsm8k_aug/test.txt",
    ]
    out = []
    for kv in SIZE + BUDGET[method] + paths:
        out += ["--set", kv]
    return out


def _records(run: Path) -> list[dict]:
    """metrics.jsonl without its timings (the only thing allowed to differ)."""
    drop = {"examples_per_s", "train_s", "ttft_ms", "ms_per_example", "cpu"}
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in drop} for x in lines]


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), (a, k)


@pytest.mark.parametrize("method", METHODS)
def test_gsm8k_recipe_trains_evaluates_and_resumes_exactly(
    method: str, tmp_path: Path, shared_data: Path, monkeypatch
) -> None:
    from rim.trainer import Trainer

    monkeypatch.chdir(ROOT)  # recipes name their bases relative to themselves, data here
    monkeypatch.setenv("RIM_NO_PROGRESS", "1")
    recipe = ["--config", f"configs/gsm8k/gpt2_{method}.yaml", *_sets(method, shared_data)]
    ref, run = tmp_path / "ref", tmp_path / "run"
    rim_main("train", *recipe, "--out", str(ref), "--test")  # then scores best/ on data.test

    original = Trainer.save_resumable

    def crash_at_step_6(self):  # a SIGKILL right after the checkpoint of step 6
        original(self)
        if self.state.global_step == 6:
            raise Crash

    monkeypatch.setattr(Trainer, "save_resumable", crash_at_step_6)
    with pytest.raises(Crash):  # rows built by 2 DataLoader workers, running ahead
        rim_main("train", *recipe, "--set", "train.loader_workers=2", "--out", str(run))
    monkeypatch.setattr(Trainer, "save_resumable", original)
    assert not (run / "final").exists()
    rim_main("train", "--resume", str(run))

    for folder in ("final", "best"):
        _same_weights(ref / folder, run / folder)
    assert _records(run) == _records(ref)
    steps = [r["step"] for r in _records(ref) if "loss" in r]
    assert len(steps) >= 12 and all(r["loss"] > 0 for r in _records(ref) if "loss" in r)

    out = tmp_path / "eval.json"
    rim_main("eval", "--checkpoint", str(run / "best"), "--split", "test", "--out", str(out))
    res = json.loads(out.read_text())
    assert res["n"] == 4 and 0.0 <= res["accuracy"] <= 1.0
    tested = json.loads((ref / "test_eval.json").read_text())  # `rim train --test`'s own
    assert tested["records"] == res["records"] and tested["accuracy"] == res["accuracy"]
