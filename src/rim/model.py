"""Models and tokenizers: stock Hugging Face models, from local weights or built from a config.

A pretrained model (``model.path``) keeps every pretrained weight frozen: LoRA adapts the
linear layers and peft's trainable-token rows learn only the new special tokens. A model built
from a config (tiny models on synthetic tasks) trains fully with a tokenizer built locally from
the training data with `tokenizers`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from itertools import chain
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerFast,
)

from rim import flex
from rim.config import ModelConfig
from rim.errors import ConfigError, RimError

# Named sizes for models built from a config. "gpt2", "llama-1b", "llama-3b" match the shapes
# of GPT-2 (124M), Llama-3.2-1B and Llama-3.2-3B (used by the latency benchmark).
SIZES: dict[str, dict] = {
    "tiny": dict(layers=2, hidden=64, heads=4, kv_heads=4, ffn=256),
    "small": dict(layers=4, hidden=128, heads=4, kv_heads=4, ffn=512),
    "base": dict(layers=6, hidden=256, heads=8, kv_heads=8, ffn=1024),
    "gpt2": dict(layers=12, hidden=768, heads=12, kv_heads=12, ffn=3072),
    "llama-1b": dict(layers=16, hidden=2048, heads=32, kv_heads=8, ffn=8192),
    "llama-3b": dict(layers=28, hidden=3072, heads=24, kv_heads=8, ffn=8192),
}

SPECIALS = {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>", "unk": "<unk>"}


def build_config(arch: str, size: str, vocab_size: int, max_positions: int, **overrides):
    """A stock HF config of a named size (random init, for synthetic tasks and benchmarks)."""
    if size not in SIZES:
        raise ConfigError(f"model.size: {size!r} is not one of {', '.join(SIZES)}")
    s = SIZES[size]
    if arch == "gpt2":
        kw = dict(
            n_layer=s["layers"],
            n_embd=s["hidden"],
            n_head=s["heads"],
            n_inner=s["ffn"],
            n_positions=max_positions,
            vocab_size=vocab_size,
        )
    else:
        kw = dict(
            num_hidden_layers=s["layers"],
            hidden_size=s["hidden"],
            num_attention_heads=s["heads"],
            num_key_value_heads=s["kv_heads"],
            intermediate_size=s["ffn"],
            max_position_embeddings=max_positions,
            vocab_size=vocab_size,
            tie_word_embeddings=True,
        )
    kw.update(overrides)
    return AutoConfig.for_model(arch, **kw)


_WORD = re.compile(r"\d|[^\w\s]|[^\d\W]+")

# tokens joined by spaces, then the spaces the pre-tokenizer invented removed again
_JOIN_SPLIT = decoders.Sequence(
    [
        decoders.Replace(Regex("^"), " "),  # a space before every token
        decoders.Fuse(),
        decoders.Replace(Regex(r"(?<=\d) (?=\d)"), ""),  # 2 1 -> 21
        decoders.Replace(Regex(r" (?=[.,!?;:])"), ""),  # apples . -> apples.
        decoders.Strip(" ", 1, 0),
    ]
)


def build_tokenizer(
    texts: Iterable[str], extra_tokens: Iterable[str] = ()
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `texts`: single digits, punctuation and words are tokens.

    Digits are split so numbers never fall out of the vocabulary. Word-level tokens keep no
    whitespace, so the decoder re-joins what the pre-tokenizer split (digit runs, and
    punctuation onto the word before it), as the evaluator's `normalize` does: `21` prints
    as `21`, not `2 1`; digits that were apart in the text (`6 4`) print joined too.

    >>> tok = build_tokenizer(["3 + 4 = 7", "12 apples."])
    >>> tok.convert_ids_to_tokens(tok("12 apples.")["input_ids"])
    ['<bos>', '1', '2', 'apples', '.']
    >>> tok.decode(tok("12 apples. 3 + 4 = 7")["input_ids"], skip_special_tokens=True)
    '12 apples. 3 + 4 = 7'
    """
    vocab: dict[str, int] = {}
    for tok in list(SPECIALS.values()) + [str(d) for d in range(10)]:
        vocab.setdefault(tok, len(vocab))
    # words never span whitespace (`str.split` and the regex's \s agree on it), so the distinct
    # chunks, in order of first appearance, give the same words in the same order, with the
    # regex run once over far less text (GSM8K-Aug: 2M texts, mostly repeated chunks)
    chunks = dict.fromkeys(chain.from_iterable(map(str.split, dict.fromkeys(texts))))
    for word in _WORD.findall(" ".join(chunks)):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIALS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    tok.decoder = _JOIN_SPLIT
    bos = SPECIALS["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=SPECIALS["eos"],
        pad_token=SPECIALS["pad"],
        unk_token=SPECIALS["unk"],
    )
    add = [t for t in extra_tokens if t not in fast.get_vocab()]
    if add:
        fast.add_special_tokens({"additional_special_tokens": add})
    return fast


def load_tokenizer(path: str | Path, key: str = "model.tokenizer"):
    """A local tokenizer; `key` is the config key that named `path` (for error messages)."""
    if not Path(path).exists():
        raise RimError(f"{key}: {path}: no such tokenizer folder")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise RimError(f"{key}: {path}: cannot load a tokenizer ({err})") from None
    if tok.eos_token_id is None:
        raise RimError(
            f"{key}: {path}: the tokenizer has no eos token (needed to end answers; "
            "a missing pad token is fine, eos pads)"
        )
    if tok.pad_token_id is None:
        # a common case (GPT-2, Llama): pad with eos; padded keys are masked anyway
        tok.pad_token = tok.eos_token
    return tok


def build_model(cfg: ModelConfig, vocab_size: int, max_positions: int = 1024):
    """A random-init stock model of `cfg.arch`/`cfg.size`."""
    hf_cfg = build_config(cfg.arch, cfg.size, vocab_size, max_positions, **cfg.overrides)
    attn = flex.hf_attn(cfg.attn_implementation)
    if attn == flex.HF_NAME:
        flex.check_class(hf_cfg)
    hf_cfg._attn_implementation = attn
    return AutoModelForCausalLM.from_config(hf_cfg, attn_implementation=attn)


def load_pretrained(cfg: ModelConfig):
    if not Path(cfg.path).is_dir():
        raise RimError(f"model.path: {cfg.path}: no such model folder")
    attn = flex.hf_attn(cfg.attn_implementation)
    try:
        if attn == flex.HF_NAME:
            flex.check_class(AutoConfig.from_pretrained(cfg.path, local_files_only=True))
        return AutoModelForCausalLM.from_pretrained(
            cfg.path,
            local_files_only=True,
            attn_implementation=attn,
            use_safetensors=True,  # never a pickled pytorch_model.bin
        )
    except (OSError, ValueError) as err:
        raise RimError(f"model.path: {cfg.path}: cannot load a model ({err})") from None


def resize_for(model, tokenizer) -> None:
    """Grow the embeddings to the tokenizer (new special tokens); new rows start at the mean."""
    n = len(tokenizer)
    if model.get_input_embeddings().weight.shape[0] < n:
        model.resize_token_embeddings(n, mean_resizing=True)


def wrap_lora(model, cfg: ModelConfig, new_token_ids: list[int]):
    """LoRA on the linear layers plus trainable rows for the new tokens only (peft)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_targets,
        trainable_token_indices=sorted(set(new_token_ids)),
        task_type="CAUSAL_LM",
        fan_in_fan_out=model.config.model_type == "gpt2",  # GPT-2 uses Conv1D layers
    )
    return get_peft_model(model, lora)


def max_positions(model) -> int | None:
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(cfg, name, None)
        if isinstance(value, int):
            return value
    return None


def save_meta(path: str | Path, meta: dict) -> None:
    Path(path, "rim.json").write_text(json.dumps(meta, indent=2))


def load_meta(path: str | Path) -> dict:
    file = Path(path, "rim.json")
    if not file.is_file():
        raise RimError(f"{path}: not a rim checkpoint (no rim.json)")
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise RimError(f"{file}:{err.lineno}: invalid JSON") from None
    if not isinstance(meta, dict):
        raise RimError(f"{file}: expected a JSON object, got {type(meta).__name__}")
    return meta


def not_a_checkpoint(path: Path) -> RimError | None:
    """What `path` is instead of a checkpoint rim can load, in one line (or None)."""
    if not path.is_dir():
        return RimError(f"--checkpoint {path}: no such folder")
    if (path / "rim.json").is_file() and not (path / "config.yaml").is_file():
        return RimError(
            f"--checkpoint {path}: an exported model (rim export), not a training checkpoint; "
            f"serve it with transformers or lm-eval (docs/serving.md), or pass the checkpoint "
            "it was exported from"
            + (" (or --runtime onnx)" if (path / "model.onnx").is_file() else "")
        )
    if (path / "best" / "rim.json").is_file():
        return RimError(f"--checkpoint {path}: a run folder; did you mean {path / 'best'}?")
    return None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", verify=None):
    """Model, tokenizer and rim.json of a saved checkpoint (full model or LoRA adapter).

    The folder is checked against its manifest first (sizes; hashes when `verify`, or when
    small: `rim.manifest.verify_folder`); weights are read from safetensors only."""
    from rim.manifest import verify_folder

    path = Path(path)
    problem = not_a_checkpoint(path)
    if problem:
        raise problem
    verify_folder(path, verify)
    meta = load_meta(path)
    tokenizer = load_tokenizer(path)
    if meta.get("adapter"):
        from peft import PeftModel

        if not (path / "adapter_model.safetensors").is_file():
            raise RimError(f"{path}: no adapter_model.safetensors (rim reads safetensors only)")
        base = load_pretrained(ModelConfig(path=meta["base_model"]))
        resize_for(base, tokenizer)
        model = PeftModel.from_pretrained(base, str(path))
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(path), local_files_only=True, use_safetensors=True
            )
        except Exception as err:  # a missing or damaged config.json / weights
            raise RimError(f"{path}: cannot load the model ({str(err).splitlines()[0]})") from None
    model.to(device).eval()
    return model, tokenizer, meta
