"""Typed configuration: YAML recipes and `key=value` overrides mapped onto dataclasses.

Every choice METHOD.md calls "our choice" is a field here, not a constant. Unknown keys and
ill-typed values are errors that name the key (`rim.errors.ConfigError`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rim.config_depth import DepthConfig
from rim.errors import ConfigError


def _positive(section: str, obj: Any, *names: str) -> None:
    """Epoch counts and rates: > 0 where set (null means "not given this way")."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and not value > 0:
            raise ConfigError(f"{section}.{name}: must be > 0, got {value!r}")


def _at_least(low: int, section: str, obj: Any, *names: str) -> None:
    """Step counts, sizes and intervals: >= `low` where set (null means "not given")."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and value < low:
            raise ConfigError(f"{section}.{name}: must be >= {low}, got {value!r}")


@dataclass
class ModelConfig:
    path: str | None = None  # local HF model folder (pretrained weights); None = arch/size
    arch: str = "llama"  # gpt2 | llama | qwen2, for models built from a config
    size: str = "tiny"  # a name in rim.model.SIZES
    overrides: dict = field(default_factory=dict)  # extra HF config fields for built models
    tokenizer: str | None = None  # local tokenizer folder; None = `path`, else built from the data
    attn_implementation: str = "sdpa"  # sdpa | eager | flex (FlexAttention on a GPU: rim.flex)
    lora_rank: int = 128  # pretrained models only; higher = more capacity and memory
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    lora_targets: str = "all-linear"  # peft target_modules; "all-linear" = attention + MLP
    full_finetune: bool = False  # pretrained models: train all weights instead of LoRA

    def __post_init__(self) -> None:
        if self.arch not in ("gpt2", "llama", "qwen2"):
            raise ConfigError(f"model.arch: {self.arch!r} is not one of gpt2, llama, qwen2")
        if self.attn_implementation not in ("sdpa", "eager", "flex"):
            raise ConfigError("model.attn_implementation: must be sdpa, eager or flex")
        if self.lora_rank < 1:
            raise ConfigError("model.lora_rank: must be >= 1")


DATASET_FIELDS = ("question", "steps", "answer", "step_sep")  # what `columns` may map


@dataclass
class SplitConfig:
    path: str | None = None  # a data file (format detected, or set `format`)
    format: str = "auto"  # auto | json | jsonl | icot | gsm8k | gsmhard | datasets
    generator: str | None = None  # a name in rim.data.GENERATORS (instead of path)
    size: int = 1000  # generated examples
    seed: int = 0  # generator seed: use different seeds for train, valid and test
    options: dict = field(default_factory=dict)  # generator options
    limit: int | None = None  # keep the first N examples
    # a Hugging Face `datasets` source (rim.datasets_io: a save_to_disk folder, parquet,
    # arrow, csv; json with format: datasets): rim field -> the source's column
    columns: dict = field(default_factory=dict)  # e.g. {question: problem, answer: solution}
    steps_sep: str | None = None  # null: steps is a list column; else split a text column on
    # it (a literal, "sentence" or "auto", as the iCoT reader)
    split: str | None = None  # the split of a DatasetDict folder (null: its only one)

    def __post_init__(self) -> None:
        if (self.path is None) == (self.generator is None):
            raise ConfigError("data.<split>: give exactly one of path or generator")
        for key, column in self.columns.items():
            if key not in DATASET_FIELDS:
                known = ", ".join(DATASET_FIELDS)
                raise ConfigError(f"data.<split>.columns.{key}: unknown field (known: {known})")
            if not (isinstance(column, str) and column) and not (key == "steps" and column is None):
                raise ConfigError(
                    f"data.<split>.columns.{key}: expected a column name, got {column!r}"
                    + (" (steps: null = no steps)" if key == "steps" else "")
                )
        if self.steps_sep == "":
            raise ConfigError("data.<split>.steps_sep: must not be empty (null = a list column)")
        source = self.columns or self.steps_sep is not None or self.split is not None
        if source and self.generator is not None:
            raise ConfigError("data.<split>: columns, steps_sep and split are for a path")


@dataclass
class DataConfig:
    train: SplitConfig = field(default_factory=lambda: SplitConfig(generator="chain"))
    valid: SplitConfig = field(default_factory=lambda: SplitConfig(generator="chain", seed=1))
    test: SplitConfig | None = None
    max_length: int | None = None  # None = the model's maximum positions
    too_long: str = "skip"  # skip (and count) | error, for examples over max_length
    cot_join: str = "source"  # CoT text of cot/icot/coconut: source = as written (Example.cot,
    # the iCoT multiplication keeps its ` + `); space = steps joined by spaces (rim before 11)
    extra_tests: list[str] = field(default_factory=list)  # more test files, each scored like
    # data.test by `rim sweep` / `rim demo` (rim.runner: test_eval.<file stem>.json)

    def __post_init__(self) -> None:
        if self.too_long not in ("skip", "error"):
            raise ConfigError("data.too_long: must be skip or error")
        names = [Path(p).stem if isinstance(p, str) and p else None for p in self.extra_tests]
        if None in names or len(set(names)) < len(names):
            raise ConfigError("data.extra_tests: expected a list of files with distinct names")
        if self.cot_join not in ("source", "space"):
            raise ConfigError("data.cot_join: must be source or space")


@dataclass
class MemoryConfig(DepthConfig):  # + loops, loop_input, state_loss (ours)
    blocks: int = 8  # K, blocks at inference and in stage 2
    mem_tokens: int = 2  # M, <m> tokens per block (block length M + 2)
    start_token: str = "<|mem_start|>"
    mem_token: str = "<|mem|>"
    end_token: str = "<|mem_end|>"
    explain_token: str = "<|explain|>"  # the step cue of explain mode (curriculum.explain_weight)

    def __post_init__(self) -> None:
        if self.blocks < 1:
            raise ConfigError("memory.blocks: K must be >= 1")
        if self.mem_tokens < 1:
            raise ConfigError("memory.mem_tokens: M must be >= 1")
        super().__post_init__()


@dataclass
class CurriculumConfig:
    schedule: str = "relative"  # relative | absolute | uniform | none (step-weight annealing)
    stage1_epochs: float | None = 6.0  # paper: 6 epochs of grounding
    stage1_steps: int | None = None  # or a number of optimizer steps (then set epochs to null)
    stage2_epochs: float | None = 2.0  # paper: 2 epochs of refinement
    stage2_steps: int | None = None
    # explain mode: > 0 keeps a step readout after every block, behind the explain token, at
    # this weight in both stages (`rim generate --explain`); 0 = the paper's schedule
    explain_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.schedule not in ("relative", "absolute", "uniform", "none"):
            raise ConfigError(
                "curriculum.schedule: must be one of relative, absolute, uniform, none"
            )
        w = self.explain_weight
        if isinstance(w, bool) or not isinstance(w, int | float) or not 0.0 <= w <= 10.0:
            raise ConfigError(f"curriculum.explain_weight: must be a number in [0, 10], got {w!r}")
        _positive("curriculum", self, "stage1_epochs", "stage2_epochs")
        _at_least(1, "curriculum", self, "stage1_steps", "stage2_steps")


def _trackers(names: list[str] | str) -> list[str]:
    """`report_to` as a list of accelerate tracker names; a bare name is a list of one, and
    `none` (as transformers spells it) is none. Checked here, installed or not: a recipe is
    valid on a machine without the tracker (`rim eval` reads it too); `rim train` checks
    that each is installed."""
    if isinstance(names, str):
        names = [] if names == "none" else [names]
    if not names:
        return []
    from accelerate.utils import LoggerType  # accelerate's list, not a copy of it

    known = [t.value for t in LoggerType if t.value != "all"]
    for name in names:
        if name not in known:
            raise ConfigError(
                f"train.report_to: unknown tracker {name!r} (accelerate supports: "
                f"{', '.join(known)})"
            )
    return list(dict.fromkeys(names))


@dataclass
class TrainConfig:
    lr: float = 1e-4  # paper: searched in [1e-5, 1e-3]; tiny models from scratch like ~1e-3
    # usual range [1e-6, 0.1] (AdamW); outside it `load_config` warns (USUAL_RANGES)
    stage2_lr: float | None = None  # RiM stage 2 (paper: lower); None = lr
    warmup: float = 0.04  # share of each stage's steps in linear warm-up; [0, 1), warns > 0.5
    lr_schedule: str = "constant"  # after warm-up, per stage: constant (paper) | cosine (to 0)
    weight_decay: float = 0.0  # AdamW's decoupled decay; >= 0, a warning above 1
    batch_size: int = 128  # global batch (examples per optimizer step)
    micro_batch_size: int | None = None  # per forward pass and process; None = batch_size
    group_by_length: bool = False  # batches of similar-length examples (rim.batching)
    pack_tokens: int | None = None  # several examples per row up to N tokens; None = one
    loader_workers: int | None = None  # row-building workers (rim.pipeline); None: GPU 2, CPU 0
    grad_clip: float = 1.0  # max gradient norm; 0 = off; >= 0, a warning outside [0.01, 100]
    dropout: float | None = None  # None = keep the model's own; [0, 1), a warning above 0.5
    stage2_dropout: float | None = None  # RiM stage 2 (paper: higher); as dropout
    epochs: float | None = None  # single-stage methods (direct, cot, pause, icot)
    steps: int | None = None
    seed: int = 0
    eval_every: int = 0  # optimizer steps between validations; 0 = at the end of each stage
    log_every: int = 10  # >= 1
    save_every: int = 0  # optimizer steps between resumable checkpoints; 0 = stage ends only
    keep_last: int = 2  # resumable checkpoints kept (>= 1)
    mixed_precision: str | bool = "no"  # no | bf16 | fp16 (accelerate autocast, fp32 master
    # weights; fp16 with a grad scaler, GPU only: rim.speed)
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory)
    compile: bool = False  # torch.compile each decoder layer for training (rim.speed)
    threads: int | None = None  # torch CPU threads; None = torch default
    fsdp: bool = False  # shard weights, gradients, AdamW state over processes (rim.fsdp)
    # experiment trackers, through accelerate (rim.tracking): tensorboard | wandb | mlflow |
    # trackio | ... (any accelerate supports); [] = none: metrics.jsonl is always written
    report_to: list[str] | str = field(default_factory=list)
    tracking_project: str = "rim"  # W&B/trackio project, MLflow experiment, TensorBoard folder

    def __post_init__(self) -> None:
        if self.mixed_precision is False:  # YAML reads a bare `no` as false
            self.mixed_precision = "no"
        self.report_to = _trackers(self.report_to)
        if self.batch_size < 1:
            raise ConfigError("train.batch_size: must be >= 1")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ConfigError("train.micro_batch_size: must be >= 1")
        if self.pack_tokens is not None and self.pack_tokens < 1:
            raise ConfigError("train.pack_tokens: must be >= 1 (or null: one example per row)")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError("train.warmup: must be in [0, 1)")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError("train.lr_schedule: must be constant or cosine")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError("train.mixed_precision: must be no, bf16 or fp16")
        if self.lr <= 0:
            raise ConfigError("train.lr: must be > 0")
        _positive("train", self, "stage2_lr", "epochs")
        _at_least(1, "train", self, "steps", "log_every", "keep_last", "threads")
        zero_ok = ("eval_every", "save_every", "weight_decay", "grad_clip", "loader_workers")
        _at_least(0, "train", self, *zero_ok)
        for key in ("dropout", "stage2_dropout"):
            p = getattr(self, key)
            if p is not None and not 0.0 <= p < 1.0:
                raise ConfigError(f"train.{key}: must be in [0, 1) (or null), got {p!r}")


@dataclass
class EvalConfig:
    batch_size: int = 64
    max_new_tokens: int = 32  # answer tokens (CoT methods get cot_max_new_tokens)
    cot_max_new_tokens: int = 256
    val_limit: int | None = 256  # validation examples used for checkpoint selection
    timing_examples: int = 16  # batch-1 runs for the latency medians
    answer_marker: str = "####"  # separates reasoning from the answer in CoT targets

    def __post_init__(self) -> None:
        _at_least(1, "eval", self, "batch_size", "max_new_tokens", "cot_max_new_tokens")
        _at_least(1, "eval", self, "val_limit")  # null = all
        _at_least(0, "eval", self, "timing_examples")


@dataclass
class CoconutConfig:
    """Coconut as its authors' code runs it (facebookresearch/coconut); docs/baselines.md.

    Stage k <= max_stage replaces the first k steps by c * k thoughts; the epochs after
    stage max_stage train the fully latent stage (no language steps, c * max_stage thoughts).
    """

    thoughts_per_step: int = 2  # c: continuous thoughts per replaced step (paper: 2 on GSM8K)
    max_stage: int = 3  # stages replace 1..max_stage steps; later epochs: all steps latent
    stage0: bool = True  # start with CoT SFT (the paper reports both)
    epochs_per_stage: float | None = 3.0
    steps_per_stage: int | None = None
    epochs: float | None = 25.0  # the whole run (original: num_epochs); what is left after
    steps: int | None = None  # stage max_stage trains the latent stage; both null = none
    pad_latent_to_max: bool = True  # c * min(k, max_stage) thoughts for every example;
    # false: c * min(k, T) for an example with T steps (rim's earlier behaviour)
    reset_optimizer: bool = True  # a fresh AdamW every epoch (original); false = per stage
    warmup: float | None = 0.0  # LR warm-up fraction after each reset (original: none);
    # null = train.warmup
    start_token: str = "<|bot|>"
    thought_token: str = "<|latent|>"
    end_token: str = "<|eot|>"

    def __post_init__(self) -> None:
        if self.thoughts_per_step < 1:
            raise ConfigError("coconut.thoughts_per_step: must be >= 1")
        if self.max_stage < 0:
            raise ConfigError("coconut.max_stage: must be >= 0")
        if self.epochs is not None and self.steps is not None:
            raise ConfigError("coconut.epochs, coconut.steps: set at most one (the other null)")
        if self.warmup is not None and not 0.0 <= self.warmup < 1.0:
            raise ConfigError("coconut.warmup: must be in [0, 1) or null")
        _positive("coconut", self, "epochs_per_stage", "epochs")
        _at_least(1, "coconut", self, "steps_per_stage", "steps")


@dataclass
class ICoTConfig:
    """iCoT-SI as `da03/Internalize_CoT_Step_by_Step` trains it; docs/baselines.md."""

    schedule: str = "step"  # step: +1 token every round(steps_per_epoch / remove_per_epoch)
    # optimizer steps, a fresh optimizer at each (the original); epoch: remove_per_epoch tokens
    # at each epoch boundary (rim before issue 11)
    remove_per_epoch: float = 8.0  # CoT tokens removed from the left per epoch
    remove_all_when_remove_beyond: int | None = None  # drop the whole CoT once the removal
    # reaches this (the original: 39 on GSM8K); None = never (its `inf`)
    removal_smoothing_lambda: float | None = 4.0  # each example removes k more tokens,
    # P(k) ~ exp(-lambda k), k < 100 (the original's recipes: 4); None = no smoothing (its inf)
    remove_start_from: int = 0  # tokens removed from the first step on (the original's flag)
    max_remove: int | None = None  # ours: never remove more (a CoT tail stays); None = no cap
    warmup: float | None = 0.0  # LR warm-up fraction after each reset; 0 = none (the original);
    # None = train.warmup (rim before issue 11)
    loss: str = "token"  # token: mean NLL over a micro-batch's target tokens (the original);
    # example: each example's mean token NLL, averaged (rim's other methods)

    def __post_init__(self) -> None:
        if self.schedule not in ("step", "epoch"):
            raise ConfigError("icot.schedule: must be step or epoch")
        if not self.remove_per_epoch > 0:
            raise ConfigError("icot.remove_per_epoch: must be > 0")
        if (
            self.remove_all_when_remove_beyond is not None
            and self.remove_all_when_remove_beyond < 1
        ):
            raise ConfigError("icot.remove_all_when_remove_beyond: must be >= 1 or null")
        lam = self.removal_smoothing_lambda
        if lam is not None and not lam > 0:
            raise ConfigError("icot.removal_smoothing_lambda: must be > 0 or null")
        if self.remove_start_from < 0:
            raise ConfigError("icot.remove_start_from: must be >= 0")
        if self.max_remove is not None and self.max_remove < 0:
            raise ConfigError("icot.max_remove: must be >= 0 or null")
        if self.warmup is not None and not 0.0 <= self.warmup < 1.0:
            raise ConfigError("icot.warmup: must be in [0, 1) or null")
        if self.loss not in ("token", "example"):
            raise ConfigError("icot.loss: must be token or example")


@dataclass
class CODIConfig:
    """CODI (Shen et al. 2025): defaults are the original's (zhenyi4/codi, GSM8K GPT-2 script)."""

    latents: int = 6  # continuous thoughts, one sequential forward pass each (original: 6)
    projection: bool = True  # MLP on each fed-back hidden state (original use_prj: True)
    projection_dim: int | None = None  # its hidden width; None = the model's (original: same)
    projection_dropout: float = 0.0  # before the MLP (original prj_dropout: 0)
    projection_norm: bool = True  # LayerNorm after the MLP (original prj_no_ln: False)
    teacher_weight: float = 1.0  # alpha: teacher CoT CE (original ref_loss_factor)
    student_weight: float = 1.0  # beta: student answer CE
    distill_weight: float = 1.0  # gamma (original distill_loss_factor: GPT-2 1, Llama-1B 20)
    distill_loss: str = "smooth_l1"  # smooth_l1 (original) | l2 | l1 (the paper's equation)
    distill_std_norm: bool = True  # divide by the teacher states' std (distill_loss_div_std)
    drop_last_step: bool = True  # teacher CoT without its last step (include_last_cot: False)
    reduction: str = "batch"  # batch: token means and std over the micro-batch (original) |
    # example: per example, then / global batch (exact under any accumulation)
    separate_target_pass: bool = False  # a 2nd, no-grad teacher pass gives the distillation
    # targets (original; differs only under dropout); false = the CE pass's states, detached
    train_new_tokens: bool = False  # LoRA: train the <bot>/<eot> rows (false = frozen, original)
    start_token: str = "<|bot|>"
    end_token: str = "<|eot|>"

    def __post_init__(self) -> None:
        if self.latents < 1:
            raise ConfigError("codi.latents: must be >= 1")
        if self.projection_dim is not None and self.projection_dim < 1:
            raise ConfigError("codi.projection_dim: must be >= 1 (or null = hidden size)")
        if not 0.0 <= self.projection_dropout < 1.0:
            raise ConfigError("codi.projection_dropout: must be in [0, 1)")
        if self.distill_loss not in ("smooth_l1", "l2", "l1"):
            raise ConfigError("codi.distill_loss: must be smooth_l1, l2 or l1")
        if self.reduction not in ("batch", "example"):
            raise ConfigError("codi.reduction: must be batch or example")
        for key in ("teacher_weight", "student_weight", "distill_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"codi.{key}: must be >= 0")
        if self.start_token == self.end_token:
            raise ConfigError("codi.end_token: must differ from codi.start_token")


@dataclass
class Config:
    method: str = "rim"  # a name in rim.methods.METHODS (checked when the method is built)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    coconut: CoconutConfig = field(default_factory=CoconutConfig)
    icot: ICoTConfig = field(default_factory=ICoTConfig)
    codi: CODIConfig = field(default_factory=CODIConfig)

    def to_dict(self) -> dict:
        return asdict(self)


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp`; build nested dataclasses; name `key` on error."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not a valid {tp}")
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if tp is float:
        if isinstance(value, str) and _FLOAT.match(value.strip()):
            value = float(value)  # YAML 1.1 reads `1e-3` (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys and wrong types are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown config key")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        msg = str(err)
        if prefix and not msg.startswith(prefix):
            # nested validators name their own key relative to the section
            msg = msg.replace("data.<split>", prefix.rstrip("."))
        raise ConfigError(msg) from None


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` override (value parsed as YAML) to a nested dict in place."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment}: expected key=value")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a section")
    node[parts[-1]] = value


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping")
    return data


def merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`, recursively for mappings (a new dict; inputs untouched).

    >>> merge({"train": {"lr": 1, "steps": 5}}, {"train": {"lr": 2}})
    {'train': {'lr': 2, 'steps': 5}}
    """
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_recipe(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A recipe as a plain dict, with `base: other.yaml` resolved (relative to the file).

    The recipe's keys override its base's, merged recursively, so variants share one base
    (`configs/demo/<method>.yaml` on `configs/demo/base.yaml`). Bases may nest; cycles are
    errors.
    """
    path = Path(path)
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: base: include cycle")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a file name, got {base!r}")
    parent = read_recipe(path.parent / base, (*_seen, path.resolve()))
    return merge(parent, data)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe (optional, with its `base:` chain), apply overrides, validate once."""
    data: dict = {}
    if path is not None:
        data = read_recipe(path)
    for assignment in overrides or []:
        apply_override(data, assignment)
    try:
        cfg = from_dict(Config, data)
    except ConfigError as err:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{err}") from None
    _warn_unusual(cfg)
    return cfg


# Legal but unusual values, more often a typo (1e6 for 1e-6) than meant: `load_config` warns
# once per key and value, `rim: warning: KEY: V is outside the usual range [LO, HI]`, and uses
# the value (a researcher may mean it). 0 (off, none) is never unusual.
USUAL_RANGES: dict[str, tuple[float, float]] = {
    "train.lr": (1e-6, 0.1),  # AdamW: fine-tuning ~1e-5..1e-4, tiny models from scratch ~1e-3
    "train.stage2_lr": (1e-6, 0.1),
    "train.weight_decay": (0.0, 1.0),  # decoupled decay: 0.01..0.1 is usual
    "train.warmup": (0.0, 0.5),  # a fraction of each stage
    "train.grad_clip": (0.01, 100.0),  # max gradient norm (0 = off)
    "train.dropout": (0.0, 0.5),
    "train.stage2_dropout": (0.0, 0.5),
}
_warned: set[str] = set()  # lines already printed by this process (a resume loads twice)


def unusual(cfg: Config) -> list[str]:
    """`KEY: V is outside the usual range [LO, HI]` for each value outside USUAL_RANGES."""
    lines = []
    for key, (lo, hi) in USUAL_RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None and value != 0 and not lo <= value <= hi:
            lines.append(f"{key}: {value:g} is outside the usual range [{lo:g}, {hi:g}]")
    return lines


def _warn_unusual(cfg: Config) -> None:
    if int(os.environ.get("RANK", "0")) != 0:  # one warning from a multi-process launch
        return
    for line in unusual(cfg):
        if line not in _warned:
            _warned.add(line)
            print(f"rim: warning: {line} (used as given)", file=sys.stderr)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
