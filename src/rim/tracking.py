"""Experiment tracking through accelerate's trackers: TensorBoard, W&B, MLflow, trackio, ...

    train: {report_to: [tensorboard]}          # or --set train.report_to=[tensorboard,wandb]
    tensorboard --logdir runs/x/tracking

`metrics.jsonl` stays the run's own record and is always written; every record it gets is
also sent to the trackers in `train.report_to` (`accelerator.log`, at the record's global
step), as scalars named `<stage>/<key>`: `stage1/loss`, `stage1/lr`, `stage1/examples_per_s`,
`stage2/valid_accuracy`, `stage2/valid_token_accuracy` (a list, such as per-block accuracy,
one scalar per item: `<stage>/<key>/<block>`), and at the end `run/train_s` and
`run/best_valid_accuracy`. The recipe goes in once as flat hyper-parameters (`train.lr`).

Trackers that write files write them in `RUN/tracking/` (TensorBoard: `RUN/tracking/<project>`;
W&B: `RUN/tracking/wandb`, so `WANDB_MODE=offline` keeps a run there for `wandb sync`;
MLflow: `RUN/tracking/mlflow.db` unless MLFLOW_TRACKING_URI is set). trackio keeps its own.
A resumed run logs again from its checkpoint's step, the same values an uninterrupted run
logs (exact resume): TensorBoard is told to purge the abandoned steps after it
(`purge_step`), W&B continues the same run (its id is rim's run id).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rim.errors import RimError
from rim.runs import flatten

FOLDER = "tracking"
EXTRAS = {"tensorboard": "track", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
_SKIPPED = ("step", "stage_step", "stage", "event")  # a record's place, not a measurement


def check_installed(report_to: list[str]) -> None:
    """Refuse at once a tracker whose library is missing (accelerate would skip it quietly)."""
    if not report_to:
        return
    from accelerate.tracking import get_available_trackers

    found = {str(t.value) for t in get_available_trackers()}
    for name in report_to:
        if name not in found:
            how = f"rim[{EXTRAS[name]}]" if name in EXTRAS else name
            raise RimError(f"train.report_to: {name} is not installed (pip install '{how}')")


def accelerator_options(report_to: list[str], out: Path) -> dict[str, Any]:
    """`Accelerator(**options)` for these trackers: `log_with`, and `RUN/tracking` as the
    logging directory. Nothing when there are none, so such a run builds what it always did."""
    if not report_to:
        return {}
    from accelerate.utils import ProjectConfiguration

    check_installed(report_to)
    folder = Path(out) / FOLDER
    config = ProjectConfiguration(project_dir=str(out), logging_dir=str(folder))
    return {"log_with": list(report_to), "project_config": config}


def hyperparameters(recipe: dict) -> dict[str, Any]:
    """The recipe as flat `section.key` hyper-parameters; lists and mappings as JSON text,
    since trackers take only numbers, strings, booleans and None."""
    out = {}
    for key, value in flatten(recipe).items():
        ok = value is None or isinstance(value, bool | int | float | str)
        out[key] = value if ok else json.dumps(value)
    return out


def local_stores(report_to: list[str], out: Path) -> None:
    """Trackers whose default store is the working directory write in RUN/tracking instead:
    MLflow (3) would make `./mlflow.db` wherever `rim train` runs. MLFLOW_TRACKING_URI, when
    set, wins."""
    if "mlflow" in report_to and not os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow

        db = (Path(out) / FOLDER / "mlflow.db").resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(f"sqlite:///{db}")


def init_kwargs(out: Path, run_id: str, resumed_at: int | None) -> dict[str, dict]:
    """Each tracker's own start options: where it writes, the run's name and id, and on a
    resume what to continue from (`resumed_at` = the checkpoint's global step)."""
    out = Path(out)
    folder = out / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    kwargs = {
        "wandb": {"dir": str(folder), "name": out.name, "id": run_id, "resume": "allow"},
        "mlflow": {"run_name": out.name},
        "trackio": {"name": out.name},
    }
    if resumed_at is not None:  # later steps of the abandoned branch are hidden
        kwargs["tensorboard"] = {"purge_step": resumed_at + 1}
    return kwargs


def scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl record as tracker scalars `<stage>/<key>` (see the module docstring).

    >>> scalars({"stage": "stage1", "step": 3, "stage_step": 3, "loss": 0.5, "lr": 1e-3})
    {'stage1/loss': 0.5, 'stage1/lr': 0.001}
    >>> scalars({"event": "done", "train_s": 2.0, "best_valid_accuracy": 0.75})
    {'run/train_s': 2.0, 'run/best_valid_accuracy': 0.75}
    """
    group = record.get("stage") or "run"
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in _SKIPPED:
            continue
        if _number(value):
            out[f"{group}/{key}"] = value
        elif isinstance(value, list) and value and all(_number(v) for v in value):
            out |= {f"{group}/{key}/{i}": v for i, v in enumerate(value, 1)}
    return out


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
