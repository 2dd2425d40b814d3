"""`rim bench`: schema and bookkeeping on a tiny model (timing targets live in docs/benchmarks.md,
not here: CI machines are shared and noisy)."""

from __future__ import annotations

import json
import math

import pytest

from rim import bench
from rim.curriculum import Stage
from rim.methods.rim import Grounding

Q, COT, ANS, THOUGHTS = 12, 5, 3, 4


@pytest.fixture(scope="module")
def tiny():
    return bench.load_bench_model("tiny")


def test_latency_json_schema_and_counts(capsys):
    from rim.cli import main

    main(
        [
            "bench",
            "latency",
            "--model",
            "tiny",
            "--runs",
            "2",
            "--warmup",
            "1",
            "--question-tokens",
            str(Q),
            "--cot-tokens",
            str(COT),
            "--answer-tokens",
            str(ANS),
            "--thoughts",
            str(THOUGHTS),
            "--threads",
            "1",
            "--json",
        ]
    )
    res = json.loads(capsys.readouterr().out)
    methods = {"direct", "rim", "coconut", "cot"}
    assert set(res["ms"]) == methods and set(res["latency_ms"]) == methods
    assert set(res["ratios"]) == {"rim/direct", "coconut/rim", "cot/rim"}
    assert {"cpu", "cores", "device", "torch"} <= set(res["machine"])
    assert all(v > 0 for v in res["ms"].values())
    assert all(math.isfinite(v) and v > 0 for v in res["ratios"].values())
    assert res["ratios"]["rim/direct"] == pytest.approx(res["ms"]["rim"] / res["ms"]["direct"])
    assert set(res["paired_ratios"]) == set(res["ratios"])
    assert set(res["plain_ms"]) == methods and set(res["overhead"]) == methods
    c = res["counts"]
    # the configured number of tokens, and sequential passes: prefill + one per further token
    assert c["direct"]["generated_tokens"] == c["rim"]["generated_tokens"] == ANS
    assert c["coconut"]["generated_tokens"] == ANS
    assert c["cot"]["generated_tokens"] == COT + ANS
    assert c["direct"]["forward_passes"] == c["rim"]["forward_passes"] == ANS
    assert c["cot"]["forward_passes"] == 1 + COT + ANS - 1
    # x<bot>, thoughts 1..n-1, thought n with <eot> (the original's n + 1), then a pass per token
    assert c["coconut"]["forward_passes"] == THOUGHTS + 1 + ANS - 1
    for n in methods:
        assert c[n]["forward_passes"] == c[n]["expected_forward_passes"]
        assert c[n]["same_tokens_as_plain"], n  # the plain loop computes the same answer
    assert c["direct"]["prompt_tokens"] == Q
    assert c["rim"]["prompt_tokens"] == Q + 8 * 4  # K=8 blocks of M+2=4 tokens
    assert c["coconut"]["prompt_tokens"] == Q + 1  # <bot>


def test_latency_batch_and_cot_ttft_index(tiny):
    res = bench.latency_bench(
        tiny,
        batch=3,
        question_tokens=Q,
        cot_tokens=COT,
        answer_tokens=2,
        thoughts=3,
        runs=1,
        warmup=0,
        methods=("direct", "cot"),
        plain=False,
    )
    assert res["counts"]["cot"]["generated_tokens"] == COT + 2
    assert res["ms"]["rim"] is None and res["ratios"]["cot/rim"] is None
    # CoT's first answer token comes after its reasoning tokens
    assert res["ms"]["cot"] < res["latency_ms"]["cot"]
    assert "plain_ms" not in res


def test_missing_method_is_skipped_with_a_note(tiny, monkeypatch):
    from rim import methods

    reduced = {k: v for k, v in methods.METHODS.items() if k != "coconut"}
    monkeypatch.setattr(methods, "METHODS", reduced)
    res = bench.latency_bench(
        tiny, question_tokens=Q, cot_tokens=2, answer_tokens=1, runs=1, warmup=0, plain=False
    )
    assert res["ms"]["coconut"] is None and res["ratios"]["coconut/rim"] is None
    assert any("coconut" in n for n in res["notes"])


def test_question_text_has_the_requested_length(tiny):
    for n in (2, 7, 60):
        text = bench.question_text(tiny.tokenizer, n)
        assert len(tiny.tokenizer(text)["input_ids"]) == n


def test_coconut_split():
    assert bench.coconut_split(6) == (2, 3)
    assert bench.coconut_split(5) == (1, 5)
    assert bench.coconut_split(0) == (2, 0)


def test_named_sizes_use_their_family_vocabulary():
    assert bench.FAMILY["gpt2"] == ("gpt2", 50257)
    assert bench.FAMILY["llama-1b"][1] == bench.FAMILY["llama-3b"][1] == 128256


def test_naive_per_readout_loss_equals_packed_loss(tiny):
    """The naive alternative computes the same loss and gradients, with K passes instead of one."""
    rim = bench.make_method("rim", tiny.tokenizer, blocks=5, never_stop=False)
    exs = bench.gsm8k_like(3, question_tokens=15, steps=4, step_tokens=4, seed=1)
    s1 = Stage("stage1", 0, 1, 1e-3, None, Grounding(4))
    model = tiny.model.eval()
    batches = bench.naive_batches(rim, exs, s1, 0.3)
    assert len(batches) == 4  # steps 2-4 and the answer: step 1 has faded out at p = 0.3
    model.zero_grad()
    packed = rim.loss(model, exs, s1, 0.3, 3, tiny.device)
    packed.backward()
    g_packed = model.get_input_embeddings().weight.grad.clone()
    model.zero_grad()
    naive = bench.naive_step(rim, model, exs, s1, 0.3, 3, tiny.device)
    g_naive = model.get_input_embeddings().weight.grad.clone()
    model.zero_grad()
    assert naive == pytest.approx(packed.item(), rel=1e-5)
    # a relative norm, not per element: near-zero entries carry only rounding noise
    assert float((g_naive - g_packed).norm() / g_packed.norm()) < 1e-5


def test_train_bench_returns_three_entries(tiny):
    res = bench.train_bench(
        tiny,
        batch=2,
        question_tokens=20,
        steps_per_example=3,
        step_tokens=4,
        thoughts=2,
        runs=1,
        warmup=1,
    )
    names = {"rim_packed", "rim_naive", "coconut"}
    assert set(res["examples_per_s"]) == names
    assert all(res["examples_per_s"][n] > 0 for n in names)
    assert set(res["peak_mb"]) == names and set(res["ms"]) == names
    assert res["ratios"]["packed/naive"] > 0 and res["ratios"]["packed/coconut"] > 0
    t = res["tokens_per_batch"]
    assert t["rim_packed"] < t["rim_naive"]  # the question and blocks are shared
    json.dumps(res)
    tiny.model.eval()


def test_any_block_ratio_is_finite(tiny):
    res = bench.any_block_bench(
        tiny, batch=8, examples=8, question_tokens=10, blocks=3, runs=1, warmup=0
    )
    assert math.isfinite(res["ratios"]["any/final"]) and res["ratios"]["any/final"] > 0


def test_any_block_branches_match_separate_runs(tiny):
    """Branch k of the shared any-block decode sees exactly `x ++ m_1..m_k` (left padding too)."""
    from rim.decoders import decode

    m = bench.make_method("rim", tiny.tokenizer, blocks=3)
    K = 3
    texts = [bench.question_text(tiny.tokenizer, n, seed=n) for n in (4, 9)]
    any_out = decode(m, tiny.model, texts, "all-blocks")
    for k in range(1, K + 1):
        one = decode(m, tiny.model, texts, blocks=k)
        assert [any_out.tokens[b * K + k - 1] for b in range(2)] == one.tokens


def test_bench_cli_errors_name_the_flag():
    from rim.errors import RimError

    with pytest.raises(RimError, match="--model"):
        bench.load_bench_model("no-such-size")
    with pytest.raises(RimError, match="--dtype"):
        bench.parse_dtype("float8")


# --------------------------------------------------------------------- rim bench train --data

LINES = [  # GSM8K-Aug lines of different lengths: random order pads, grouping pads less
    "Tom has 3 apples and buys 4 more. How many apples?||<<3+4=7>> #### 7",
    "A box holds 12 eggs. How many eggs are in 5 boxes?||<<12*5=60>> #### 60",
    "Sam reads 10 pages a day for 3 days, then 7 more pages. How many pages did Sam read in "
    "all, counting every day of the week he spent reading the long book?||<<10*3=30>> "
    "<<30+7=37>> #### 37",
    "Ann had 9 coins and lost 2.||<<9-2=7>> #### 7",
    "A farmer has 4 fields of 25 cows and sells 30 cows, then buys 12. How many cows now?"
    "||<<4*25=100>> <<100-30=70>> <<70+12=82>> #### 82",
    "Pens cost 2 dollars. How much are 6 pens?||<<2*6=12>> #### 12",
    "Lia walks 3 miles a day. How far in 7 days?||<<3*7=21>> #### 21",
    "Max has 50 cards, gives away 15 and splits the rest between 5 friends. How many does "
    "each friend get?||<<50-15=35>> <<35/5=7>> #### 7",
]


@pytest.fixture
def aug_file(tmp_path):
    path = tmp_path / "aug.txt"
    path.write_text("\n".join(LINES) + "\n")
    return str(path)


def test_train_data_json_has_the_five_variants(aug_file, capsys, monkeypatch):
    """`rim bench train --data FILE --json`: a `rows` list, one entry per variant."""
    from rim.bench import run
    from rim.cli import main

    quick = run.data_train_bench  # peak memory (a fresh process each): test_peak_memory_*
    monkeypatch.setattr(run, "data_train_bench", lambda **kw: quick(memory=False, **kw))
    main(["bench", "train", "--data", aug_file, "--model", "tiny", "--batch", "4",
          "--micro-batch", "2", "--runs", "1", "--warmup", "1", "--threads", "1", "--json"])  # fmt: skip
    res = json.loads(capsys.readouterr().out)
    assert [r["variant"] for r in res["rows"]] == list(bench.DATA_VARIANTS)
    assert bench.DATA_VARIANTS == (
        "causal-packed", "rim-stage1", "rim-stage2", "rim-stage1-today", "naive"
    )  # fmt: skip
    for r in res["rows"]:
        assert {"variant", "real_tokens_per_s", "step_ms", "peak_mb"} <= set(r)
        assert r["real_tokens_per_s"] > 0 and r["step_ms"] > 0 and r["peak_mb"] is None
    assert set(res["ratios"]) >= set(bench.train_data.TARGETS)
    by = {r["variant"]: r for r in res["rows"]}
    ratio = res["ratios"]["rim-stage1/causal-packed tokens/s >= 0.85"]["ratio"]
    want = by["rim-stage1"]["real_tokens_per_s"] / by["causal-packed"]["real_tokens_per_s"]
    assert ratio == pytest.approx(want)
    assert res["config"]["micro_batch"] == 2 and res["config"]["pool_examples"] == 8
    assert res["machine"]["torch_threads"] == 1
    assert by["causal-packed"]["padding"] == 0.0  # padding-free by construction


def test_train_data_real_tokens_exclude_padding(aug_file):
    """Real tokens are the examples' own: padding in the tensors never counts."""
    from rim.layout import pack

    spec = dict(data=aug_file, batch=8, micro_batch=4, runs=1, warmup=0, memory=False)
    variants = ("causal-packed", "rim-stage1-today")
    w = bench.Workload("tiny", bench.DataSpec(**spec))
    s1 = w.stages["rim-stage1"]
    layout = sum(len(pack(w.today.segments(ex, s1, 0.0), w.today.eos_id)) for ex in w.pool)
    cot = sum(len(w.cot_ids[i]) for i in range(len(w.pool)))
    res = bench.data_train_bench("tiny", variants=variants, **spec)
    by = {r["variant"]: r for r in res["rows"]}
    today = by["rim-stage1-today"]
    assert today["real_tokens"] == layout < today["padded_tokens"]  # one epoch of the pool
    # one timed step: the rate is real tokens (not padded ones) over the step's time
    assert today["real_tokens_per_s"] * today["step_ms"] / 1e3 == pytest.approx(layout)
    assert by["causal-packed"]["real_tokens"] == cot == by["causal-packed"]["padded_tokens"]


def test_train_data_today_path_and_new_path_train_the_same_loss(aug_file):
    """rim-stage1-today and rim-stage1 differ in cost only: the same loss (and the causal
    anchor's flattened rows give each example's own loss: attention stays inside it)."""
    from rim.bench.train_data import flat_loss, today_loss

    w = bench.Workload("tiny", bench.DataSpec(aug_file, batch=8, runs=1, warmup=0))
    model, exs, s1 = w.bm.model.eval(), w.pool[:5], w.stages["rim-stage1"]
    old, _ = today_loss(w.today, model, exs, s1, 0.0, 8, w.bm.device)
    new, _ = w._new("rim-stage1", exs)
    assert new.item() == pytest.approx(old.item(), rel=1e-5)
    seqs = w.cot_ids[:3]
    flat = flat_loss(model, w.flatten([{"input_ids": s} for s in seqs]), w.bm.device)
    import torch

    each = [model(input_ids=torch.tensor([s]), labels=torch.tensor([s])).loss for s in seqs]
    want = sum(e * (len(s) - 1) for e, s in zip(each, seqs)) / sum(len(s) - 1 for s in seqs)
    assert flat.item() == pytest.approx(want.item(), rel=1e-5)


def test_peak_memory_in_a_fresh_process(aug_file):
    spec = bench.DataSpec(aug_file, batch=4, micro_batch=4, runs=2, warmup=0)
    mb, how = bench.train_data.measure_peak("tiny", spec, "cpu", "float32", "rim-stage1", 1)
    assert how.startswith("cpu VmHWM") and mb > 0


def test_train_data_too_few_examples(aug_file):
    from rim.errors import RimError

    with pytest.raises(RimError, match="--data .*8 examples.*= 16"):
        bench.Workload("tiny", bench.DataSpec(aug_file, batch=4, runs=3))
