"""The lm-evaluation-harness task `rim export` writes beside the model: `EXPORT/lm_eval/`.

    lm_eval --model hf --model_args pretrained=EXPORT --include_path EXPORT/lm_eval --tasks NAME

    lm_eval/
        NAME.yaml    generate_until, greedy; the prompt is the export's template (question + K blocks)
        data.jsonl   the examples: question, steps, answer (rim reads it too), target, marker
        utils.py     a verbatim copy of rim/answers.py: `rim eval`'s normalisation, no rim import

Scoring matches `rim eval`: the response (lm-eval decodes it skipping special tokens, so block
tokens a model emits vanish as in rim) is normalised by `utils.normalize_answers` with the
doc's marker, and lm-eval's `exact_match` compares it with `target`, the gold answer normalised
by `rim.evaluation.gold_answers` (through the tokenizer, as `rim eval` does). No chat template,
zero-shot, and the tokenizer's usual BOS (what the export checks its template against).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from rim.errors import RimError

DEFAULT_LIMIT = 1000  # examples written when the recipe's split is used


def task_name(out: Path) -> str:
    """`rim_` + the export folder's name, lower case, other characters as `_`."""
    return "rim_" + (re.sub(r"[^0-9a-z]+", "_", Path(out).name.lower()).strip("_") or "export")


def jinja_prompt(template: str) -> str:
    """The export's `str.format` template as the Jinja lm-eval renders `doc_to_text` with."""
    suffix = template.format(question="")
    if "{" in suffix or "%" in suffix:  # keep the block text literal
        suffix = "{% raw %}" + suffix + "{% endraw %}"
    return "{{question}}" + suffix


def task_examples(cfg, data: str | None, fmt: str, limit: int | None) -> tuple[list, str]:
    """(examples, where from): `data` (any format rim reads, a `datasets` source too), else
    the checkpoint recipe's test split, else its valid split; at most `limit` (default 1000)."""
    from rim.sources import load_split, read_path

    limit = DEFAULT_LIMIT if limit is None else limit
    if limit < 1:
        raise RimError(f"--lm-eval-limit: must be >= 1, got {limit}")
    if data:
        return read_path(data, fmt, limit=limit, key="--lm-eval-data"), data
    split = "test" if cfg.data.test is not None else "valid"
    examples = load_split(getattr(cfg.data, split), f"data.{split}")
    return examples[:limit], f"data.{split} of the recipe"


def _yaml(name: str, template: str, method, eos_text: str, n: int) -> str:
    """The task YAML (written as text: lm-eval's `!function` tags are not plain YAML)."""
    q = json.dumps  # a JSON string is a valid YAML double-quoted scalar
    return f"""# lm-evaluation-harness task for the rim export in the parent folder ({n} examples).
#   lm_eval --model hf --model_args pretrained=EXPORT --include_path EXPORT/lm_eval --tasks {name}
task: {name}
custom_dataset: !function utils.load_docs
dataset_kwargs:
  data_file: data.jsonl
test_split: test
output_type: generate_until
num_fewshot: 0
doc_to_text: {q(jinja_prompt(template))}
doc_to_target: target
generation_kwargs:
  until: {q([eos_text] if eos_text else [])}
  do_sample: false
  max_gen_toks: {method.max_new_tokens()}
filter_list:
  - name: rim_normalize
    filter:
      - function: custom
        filter_fn: !function utils.normalize_answers
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  method: {q(method.name)}
"""


def write_task(folder: Path, name: str, method, template: str, examples: list) -> None:
    """Write the task folder `folder` (YAML, data, utils.py) for `examples`."""
    from rim.evaluation import gold_answers

    if not examples:
        raise RimError("lm-eval task: no examples")
    folder.mkdir(parents=True)
    golds = gold_answers(method, examples)
    with open(folder / "data.jsonl", "w", encoding="utf-8") as f:
        for ex, gold in zip(examples, golds):
            rec = {"question": ex.question, "steps": list(ex.steps), "answer": ex.answer}
            rec |= {"target": gold, "marker": method.marker}  # as rim eval normalises
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    eos = method.tokenizer.eos_token or ""  # lm-eval stops at EOS anyway; no "\n\n" default
    (folder / f"{name}.yaml").write_text(_yaml(name, template, method, eos, len(examples)))
    shutil.copyfile(Path(__file__).with_name("answers.py"), folder / "utils.py")
