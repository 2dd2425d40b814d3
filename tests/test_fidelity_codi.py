"""CODI pinned to the original (`zhenyi4/codi` at 4fd88d4, `train.py` + `src/model.py`).

The sequences below were written by hand from the original's `preprocess` and collator with
its GPT-2 script's flags (`remove_eos`, `include_last_cot` false, `num_latent` 6, `use_prj`,
`distill_loss_div_std`), with the original's answer prompt "The answer is:" as the marker:

    encoder_input_ids  question ++ <bot>
    ref_input_ids      question ++ CoT without its last step ++ answer ++ EOS
    ref_labels         ref_input_ids, -100 over the question
    decoder_input_ids  <eot> ++ answer ++ EOS          (labels: the same ids)
    distilled token    ref_answer_position - 1 / model_answer_position - 1: the colon

`original_forward` re-states `CODI.forward` line by line (teacher with and without grad,
latents through `prj`, then the decoder with the cache, SmoothL1 per layer / teacher std,
token-mean CEs over the batch); rim's loss and gradients must equal it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rim.compat import cache_of, with_cache
from rim.curriculum import Stage
from rim.data import Example
from rim.methods import build

from .conftest import make_setup

CPU = torch.device("cpu")
MARKER = "The answer is:"
EXAMPLES = [  # equal question lengths: the original left-pads without position ids
    Example("3 + 4 - 2", ("7", "5"), "5"),
    Example("9 + 9 - 1", ("18", "17"), "17"),
]
Q = ["<bos>", "3", "+", "4", "-", "2"]
A = ["The", "answer", "is", ":", "5", "<eos>"]
Q2 = ["<bos>", "9", "+", "9", "-", "1"]
A2 = ["The", "answer", "is", ":", "1", "7", "<eos>"]
ORIGINAL = [  # (encoder, ref_input_ids, labels mask of ref, decoder, ref pos - 1, model pos - 1)
    (Q + ["<|bot|>"], Q + ["7"] + A, [0] * 6 + [1] * 7, ["<|eot|>"] + A, 10, 4),
    (Q2 + ["<|bot|>"], Q2 + ["1", "8"] + A2, [0] * 6 + [1] * 9, ["<|eot|>"] + A2, 11, 4),
]


def codi_setup(arch: str = "llama", attn: str = "sdpa", **over):
    from rim.model import resize_for

    cfg, tok, model, _ = make_setup("cot", arch, attn, eval__answer_marker=MARKER, **over)
    cfg.method = "codi"
    m = build(cfg, tok)
    torch.manual_seed(1)
    resize_for(model, tok)
    model = m.attach(model)
    torch.manual_seed(2)
    with torch.no_grad():  # a non-trivial LayerNorm (default init is 1 / 0)
        for p in m.projection.ln.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return cfg, tok, model, m


def names(tok, ids) -> list[str]:
    return tok.convert_ids_to_tokens(list(ids))


def test_layout_is_the_originals():
    _, tok, _, m = codi_setup()
    for ex, (enc, ref, ref_mask, dec, ref_pos, dec_pos) in zip(EXAMPLES, ORIGINAL):
        lay = m.layout(ex)
        assert names(tok, lay.encoder) == enc
        assert names(tok, lay.teacher) == ref
        assert [int(i >= lay.question_len) for i in range(len(lay.teacher))] == ref_mask
        assert names(tok, lay.decoder) == dec
        assert (lay.teacher_distill, lay.student_distill) == (ref_pos, dec_pos)
        assert names(tok, lay.teacher)[ref_pos] == names(tok, lay.decoder)[dec_pos] == ":"


def test_include_last_cot_keeps_every_step():
    cfg, tok, _, m = codi_setup(codi__drop_last_step=False)
    lay = m.layout(EXAMPLES[0])
    assert names(tok, lay.teacher) == Q + ["7", "5"] + A
    assert lay.teacher_distill == 11


# ---------------------------------------------------------------- the original's forward


def batch(tok, k: int | None = None) -> dict:
    """The original collator's tensors for ORIGINAL (right-padded; no left padding needed)."""
    pad = tok.pad_token_id

    def ids(rows, fill):
        return nn.utils.rnn.pad_sequence(
            [torch.tensor(r) for r in rows], batch_first=True, padding_value=fill
        )

    conv = tok.convert_tokens_to_ids
    enc = [conv(e) for e, *_ in ORIGINAL]
    ref = [conv(r) for _, r, *_ in ORIGINAL]
    ref_labels = [
        [t if keep else -100 for t, keep in zip(r, mk)] for r, (_, _, mk, *_) in zip(ref, ORIGINAL)
    ]
    dec = [conv(d) for *_, d, _, _ in ORIGINAL]
    return {
        "encoder_input_ids": ids(enc, pad),
        "ref_input_ids": ids(ref, pad),
        "ref_labels": ids(ref_labels, -100),
        "decoder_input_ids": ids(dec, pad),
        "labels": ids(dec, -100),
        "ref_answer_position": torch.tensor([o[4] + 1 for o in ORIGINAL]),
        "model_answer_position": torch.tensor([o[5] + 1 for o in ORIGINAL]),
    }


def original_forward(model, prj, b: dict, num_latent: int, distill_factor: float = 1.0):
    """`CODI.forward` of the original (fix_attn_mask false, smooth_l1, div_std, no llama +1)."""
    ce_fct, kd_fct = nn.CrossEntropyLoss(ignore_index=-100), nn.SmoothL1Loss()
    outputs = model(input_ids=b["encoder_input_ids"], use_cache=True, output_hidden_states=True)
    past = cache_of(outputs)
    latent_embd = prj(outputs.hidden_states[-1][:, -1, :].unsqueeze(1))
    with torch.no_grad():
        ref_outputs = model(input_ids=b["ref_input_ids"], output_hidden_states=True)
    ref_outputs_with_grad = model(input_ids=b["ref_input_ids"], output_hidden_states=True)
    model_pos, ref_pos = b["model_answer_position"] - 1, b["ref_answer_position"] - 1
    for i in range(num_latent):
        outputs = model(
            inputs_embeds=latent_embd, use_cache=True, output_hidden_states=True, **with_cache(past)
        )
        past = cache_of(outputs)
        latent_embd = prj(outputs.hidden_states[-1][:, -1, :].unsqueeze(1))
        if i == num_latent - 1:
            embds = model.get_input_embeddings()(b["decoder_input_ids"])
            outputs = model(
                inputs_embeds=embds, use_cache=True, output_hidden_states=True, **with_cache(past)
            )
            distill_loss = 0
            for out, ref_out in zip(outputs.hidden_states, ref_outputs.hidden_states):
                D = ref_out.size(-1)
                ref_sel = ref_out.gather(1, ref_pos[:, None, None].expand(-1, -1, D))
                out_sel = out.gather(1, model_pos[:, None, None].expand(-1, -1, D))
                tmp = kd_fct(out_sel, ref_sel.detach())
                tmp /= ref_sel.std()
                distill_loss += tmp
            distill_loss /= len(outputs.hidden_states)
            logits = outputs.logits
            ce_loss = ce_fct(
                logits[:, :-1, :].reshape(-1, logits.size(-1)), b["labels"][:, 1:].reshape(-1)
            )
    ref_logits = ref_outputs_with_grad.logits
    ref_ce = ce_fct(
        ref_logits[:, :-1, :].reshape(-1, ref_logits.size(-1)), b["ref_labels"][:, 1:].reshape(-1)
    )
    return ce_loss + distill_loss * distill_factor + ref_ce


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("gpt2", "eager")])
def test_loss_and_gradients_equal_the_originals_forward(arch, attn):
    cfg, tok, model, m = codi_setup(arch, attn, codi__latents=3, codi__distill_weight=2.0)
    params = [p for p in model.parameters() if p.requires_grad]
    got = m.loss(model, EXAMPLES, Stage("s", 0, 1, 1e-3), 0.0, len(EXAMPLES), CPU)
    g_got = torch.autograd.grad(got, params, allow_unused=True)
    ref = original_forward(model, m.projection, batch(tok), 3, distill_factor=2.0)
    g_ref = torch.autograd.grad(ref, params, allow_unused=True)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    for p, a, b in zip(params, g_got, g_ref):
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
