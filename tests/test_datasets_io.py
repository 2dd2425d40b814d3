"""Data splits from Hugging Face `datasets` sources (rim.datasets_io, issue 16).

The real library on local files: parquet, save_to_disk and CSV copies of data give the same
`Example` records as rim's own reader; bad columns and types are one-line errors naming the
source and the row.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rim.config import ConfigError, SplitConfig, load_config
from rim.data import Example, generate, mult_example, read_examples, write_examples
from rim.errors import DataError
from rim.sources import load_split, read_path

from .conftest import TINY_RECIPE, recipe_file

datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def _local_cache(tmp_path, monkeypatch):
    """`datasets` caches what it builds from files; keep that out of the user's home."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("RIM_NO_PROGRESS", "1")


def _generated(folder: Path) -> Path:
    """rim's own JSONL: chain examples and a multiplication with its ` + ` separator."""
    examples = generate("chain", 12, seed=3) + [mult_example(2967, 6361), mult_example(12, 34)]
    return write_examples(examples, folder / "gen.jsonl")


def _copies(ds, folder: Path) -> dict[str, Path]:
    ds.to_parquet(str(folder / "copy.parquet"))
    ds.save_to_disk(str(folder / "saved"))
    datasets.DatasetDict({"test": ds}).save_to_disk(str(folder / "saved_dict"))
    return {
        "parquet": folder / "copy.parquet",
        "save_to_disk": folder / "saved",
        "DatasetDict": folder / "saved_dict",
    }


def test_generated_set_reads_the_same_through_datasets(tmp_path):
    jsonl = _generated(tmp_path)
    native = read_examples(jsonl)
    assert any(e.step_sep == " + " for e in native)  # the optional step_sep column counts
    assert read_path(str(jsonl), "datasets") == native  # the JSON builder on the same file
    ds = datasets.load_dataset("json", data_files=str(jsonl), split="train")
    for name, path in _copies(ds, tmp_path).items():
        assert read_path(str(path)) == native, name  # detected: a .parquet file, a folder
    assert read_path(str(tmp_path / "copy.parquet"), limit=3) == native[:3]


def test_shared_prosqa_through_parquet_and_save_to_disk(tmp_path, shared_data):
    src = shared_data / "prosqa" / "prosqa_valid.json"
    native = read_examples(src)
    ds = datasets.Dataset.from_list(json.loads(src.read_text()))  # its extra columns too
    for name, path in _copies(ds, tmp_path).items():
        split = SplitConfig(path=str(path), limit=50)
        assert load_split(split, "data.valid") == native[:50], name


def test_column_map_and_a_text_steps_column_in_csv(tmp_path):
    """A CSV with other column names, steps as text: `columns` and `steps_sep` map it; CSV
    cells stay text (the answer `007` is not the number 7)."""
    native = generate("chain", 8, seed=5) + [Example("0 + 7", ("7",), "007")]
    rows = [
        {"problem": e.question, "rationale": " ".join(e.steps), "solution": e.answer}
        for e in native
    ]
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "x.csv"), index=False)
    cols = {"question": "problem", "steps": "rationale", "answer": "solution"}
    split = SplitConfig(path=str(tmp_path / "x.csv"), columns=cols, steps_sep=" ")
    assert load_split(split) == native
    no_steps = SplitConfig(path=str(tmp_path / "x.csv"), columns=cols | {"steps": None})
    assert [e.steps for e in load_split(no_steps)] == [()] * len(native)


def _parquet(tmp_path: Path, rows: list[dict]) -> str:
    path = tmp_path / "x.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


GOOD = {"problem": "1 + 2", "steps": ["3"], "solution": "3"}
COLS = {"question": "problem", "answer": "solution"}


def test_missing_column_names_the_columns_and_the_key(tmp_path):
    path = _parquet(tmp_path, [GOOD])
    with pytest.raises(DataError) as err:
        load_split(SplitConfig(path=path), "data.train")
    assert str(err.value) == (
        f"{path}: no column 'question' for question (columns: problem, steps, solution; "
        "map one with data.train.columns.question)"
    )


TEXT_STEPS = "must be a list of strings, got str (set steps_sep to split a text column)"


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            [GOOD, GOOD, GOOD | {"solution": None}],
            "row 2: column 'solution' (answer) must be a string, got null",
        ),
        ([GOOD, GOOD | {"problem": " "}], "row 1: empty question"),
        (
            [GOOD | {"steps": ["3", None]}],
            "row 0: column 'steps' item 1 must be a string, got null",
        ),
        ([GOOD | {"steps": "3"}], f"row 0: column 'steps' {TEXT_STEPS}"),  # a text column
    ],
)
def test_bad_row_is_one_line_naming_the_row(tmp_path, rows, message):
    path = _parquet(tmp_path, rows)
    with pytest.raises(DataError) as err:
        read_path(path, columns=COLS)
    assert str(err.value) == f"{path}: {message}"


def test_steps_one_per_line(tmp_path):
    """`steps_sep: "\\n"` splits at line breaks only (a step keeps its spaces)."""
    path = _parquet(tmp_path, [GOOD | {"steps": "x = 1 + 2\nso 3\n"}])
    (ex,) = read_path(path, columns=COLS, steps_sep="\n")
    assert ex.steps == ("x = 1 + 2", "so 3") and ex.cot == "x = 1 + 2\nso 3"


def test_wrong_column_type_is_named_with_its_row(tmp_path):
    path = _parquet(tmp_path, [GOOD | {"solution": 3}, GOOD | {"solution": 4}])
    with pytest.raises(DataError) as err:
        read_path(path, columns=COLS)
    assert str(err.value) == f"{path}: row 0: column 'solution' (answer) must be a string, got int"


def test_splits_of_a_dataset_dict(tmp_path):
    ds = datasets.Dataset.from_list([GOOD])
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    path = str(tmp_path / "dd")
    assert len(read_path(path, columns=COLS, split="test")) == 1
    with pytest.raises(DataError, match="set split to one of train, test$"):
        read_path(path, columns=COLS)
    with pytest.raises(DataError, match="no split 'valid'; it has train, test$"):
        read_path(path, columns=COLS, split="valid")


def test_recipe_keys_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"^data.train.columns.solution: unknown field"):
        load_config(overrides=["data.train.path=x.parquet", "data.train.columns={solution: a}"])
    with pytest.raises(ConfigError, match="^data.valid: columns, steps_sep and split are for"):
        load_config(
            overrides=["data.valid.generator=chain", "data.valid.steps_sep=' '"]
        )  # the default is a generator
    jsonl = _generated(tmp_path)
    with pytest.raises(ConfigError, match="is read by rim's own reader .set format: datasets"):
        load_split(SplitConfig(path=str(jsonl), columns=COLS), "data.train")
    with pytest.raises(DataError, match="no such file or folder$"):
        read_path(str(tmp_path / "none.parquet"))
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="bad.parquet: cannot read it with datasets: "):
        read_path(str(tmp_path / "bad.parquet"))


def test_rim_train_on_parquet_splits_and_a_bad_one_exits_2(tmp_path, capsys):
    """A new user's path: parquet files in the recipe; a bad file is one stderr line."""
    from rim.cli import main

    for split, seed in (("train", 0), ("valid", 1)):
        rows = [{"q": e.question, "s": list(e.steps), "a": e.answer}
                for e in generate("chain", 16, seed)]  # fmt: skip
        datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / f"{split}.parquet"))
    cols = {"question": "q", "steps": "s", "answer": "a"}
    data = {
        s: {"path": str(tmp_path / f"{s}.parquet"), "columns": cols} for s in ("train", "valid")
    }
    short = {"stage1_steps": 2, "stage2_steps": 2}
    recipe = recipe_file(TINY_RECIPE, tmp_path, data=data, curriculum=short)
    main(["train", "--config", str(recipe), "--out", str(tmp_path / "run")])
    assert (tmp_path / "run" / "best").is_dir()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["train", "--config", str(recipe), "--out", str(tmp_path / "run2"),
              "--set", "data.train.columns.answer=q2"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    assert "train.parquet: no column 'q2' for answer" in err[0]
