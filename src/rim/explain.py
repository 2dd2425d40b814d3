"""Explain mode: the step each memory block holds, decoded only when asked (issue 14).

A RiM model trained with `curriculum.explain_weight` > 0 has learned a second readout after
every block: behind the explain token (a cue the block itself never predicts) it spells the
reasoning step that block was grounded on, and nothing after the last step. The answer is
still the final decoder's, at direct-answer cost; `explain` adds the K step readouts from one
more shared prefill (the all-blocks decoder with the cue), for a user who wants to see them.

    rim generate --checkpoint RUN/best --explain "6 + 6 , 0 + 4 , ... ; above five"
    rim eval --checkpoint RUN/best --split test --explain   # step accuracy per block
"""

from __future__ import annotations

from rim.data import Example
from rim.decoders import refuse_looped
from rim.decoding import all_blocks_greedy
from rim.errors import RimError
from rim.evaluation import normalize


def check_explainable(method) -> int:
    """The explain token's id, or a one-line error for a checkpoint trained without it."""
    refuse_looped(method, "--explain")
    cue = getattr(method, "explain_id", None)
    if cue is None:
        raise RimError(
            "--explain: this checkpoint was trained without explain mode "
            "(set curriculum.explain_weight > 0 in the recipe and train again)"
        )
    return cue


EXPLAIN = "explain"  # `cue`: the explain token of a model trained with explain mode


def explain(
    method, model, questions: list[str], blocks: int | None = None, cue: int | str | None = EXPLAIN
) -> list[list[str]]:
    """The step decoded after each of the K blocks, per question ('' = the block is quiet).
    `cue=None`: the readout straight after each block, as stage 1 (grounding) trains it."""
    cue = check_explainable(method) if cue == EXPLAIN else cue
    model.eval()
    ids = [list(method.question_ids(q)) for q in questions]
    out = all_blocks_greedy(
        model, ids, method.mem.blocks(blocks), method.mem.block_len, method.pad_id,
        method.eos_id, method.common.cot_max_new_tokens, cue=cue,
        first_pass=method.first_pass(model),
    )  # fmt: skip
    texts = [t.strip() for t in method.tokenizer.batch_decode(out.tokens, skip_special_tokens=True)]
    K = out.rows_per_question
    return [texts[i * K : (i + 1) * K] for i in range(len(questions))]


def step_accuracy(
    method, model, examples: list[Example], batch_size: int = 64, blocks: int | None = None,
    cue: int | str | None = EXPLAIN,
) -> dict:  # fmt: skip
    """How well each block spells its step: accuracy of block k on examples with >= k steps
    (normalised text equal to gold step k), the mean over all steps, and the share of blocks
    after an example's last step that stay quiet (decode nothing). `cue=None`: stage 1's
    grounding readouts (is step t in block t?), no explain token."""
    per_block: dict[int, list[bool]] = {}
    quiet: list[bool] = []
    for lo in range(0, len(examples), batch_size):
        chunk = examples[lo : lo + batch_size]
        steps = explain(method, model, [e.question for e in chunk], blocks, cue)
        for ex, said in zip(chunk, steps):
            for k, text in enumerate(said, start=1):
                if k <= len(ex.steps):
                    ok = normalize(text, "") == normalize(ex.steps[k - 1], "")
                    per_block.setdefault(k, []).append(ok)
                else:
                    quiet.append(text == "")
    every = [ok for oks in per_block.values() for ok in oks]
    return {
        "step_accuracy": sum(every) / len(every) if every else None,
        "step_accuracy_per_block": [
            sum(per_block[k]) / len(per_block[k]) for k in sorted(per_block)
        ],
        "quiet_after_steps": sum(quiet) / len(quiet) if quiet else None,
    }
