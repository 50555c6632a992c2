"""Tiny random models of every supported family, a tiny tokenizer trained here, and a text to calibrate on.

Nothing is downloaded: configs are built in code, weights are random (with non-trivial norm gains so folding is
really exercised), the tokenizer is a byte-level BPE trained on generated text.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WORDS = ("river stone light window garden bread music letter mountain silver quiet morning paper winter "
         "lamp harbor orange field cloud engine market thread candle forest").split()


def make_text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_words // 12):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(12)) + ".")
    return "\n".join(lines)


def family_config(model_type: str, vocab: int = 300):
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if model_type == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=True)
    if model_type == "mistral":
        return tf.MistralConfig(**common, tie_word_embeddings=False, sliding_window=8)
    if model_type == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=True)
    if model_type == "qwen3":
        return tf.Qwen3Config(**common, head_dim=16, tie_word_embeddings=True)
    if model_type == "phi3":
        return tf.Phi3Config(**common, tie_word_embeddings=False, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    if model_type == "gemma2":
        return tf.Gemma2Config(**common, head_dim=16, tie_word_embeddings=True, sliding_window=8)
    if model_type == "gemma3_text":
        return tf.Gemma3TextConfig(**common, head_dim=16, tie_word_embeddings=True, sliding_window=8,
                                   layer_types=["sliding_attention", "full_attention"])
    raise KeyError(model_type)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text")


def tiny_model(model_type: str, seed: int = 0, vocab: int = 300):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = family_config(model_type, vocab)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                # Random gains, so a fold that forgot a reader or a norm shows up in the logits.
                offset = 0.0 if model_type.startswith("gemma") else 1.0
                p.copy_(offset + 0.5 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
    return model


_TOKENIZER_CACHE: dict = {}


def tiny_tokenizer(vocab: int = 300):
    if vocab in _TOKENIZER_CACHE:
        return _TOKENIZER_CACHE[vocab]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([make_text(3000, 99)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    _TOKENIZER_CACHE[vocab] = fast
    return fast


def save_tiny(folder: Path, model_type: str = "llama", seed: int = 0) -> Path:
    model = tiny_model(model_type, seed)
    tok = tiny_tokenizer()
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def calib_text(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "calib.txt"
    p.write_text(make_text(6000, 1))
    return p


@pytest.fixture(scope="session")
def eval_text(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("evaltext")
    with open(d / "eval.jsonl", "w") as f:
        for i, line in enumerate(make_text(4000, 2).splitlines()):
            f.write(json.dumps({"text": line, "n": i}) + "\n")
    return d / "eval.jsonl"


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


def make_recipe(**kw):
    from wina_cli.config import Recipe

    r = Recipe(model="<in-memory>")
    r.data.num_samples, r.data.seq_len = 8, 64
    r.allocation.num_samples, r.allocation.seq_len, r.allocation.step = 2, 32, 0.1
    for k, v in kw.items():
        from wina_cli.config import set_path

        set_path(r, k, v)
    return r


def run_pipeline(model_type: str, transform: str = "wina", calib_ids=None, seed: int = 0, **recipe_kw):
    """Run the full pass pipeline on a tiny model held in memory; returns the state."""
    from passes import build_pipeline
    from passes.base import PipelineState

    r = make_recipe(transform=transform, seed=seed, **recipe_kw)
    model = tiny_model(model_type, seed)
    state = PipelineState(recipe=r, model=model, tokenizer=tiny_tokenizer(), source={"spec": "<in-memory>"})
    pipe = build_pipeline(r)
    if calib_ids is None:
        g = torch.Generator().manual_seed(5)
        calib_ids = torch.randint(0, model.config.vocab_size, (r.data.num_samples, r.data.seq_len), generator=g)
    # Replace the text tokenizer pass with fixed windows: these tests are about the model passes.
    pipe.passes = [p for p in pipe.passes if p.name != "tokenize"]
    state.calib_ids = calib_ids
    from wina_cli.config import needs_holdout

    if needs_holdout(r):
        g = torch.Generator().manual_seed(6)
        state.holdout_ids = torch.randint(0, model.config.vocab_size, (r.holdout.num_samples, r.data.seq_len),
                                          generator=g)
    state.calib_provenance = {"tokens": int(calib_ids.numel()), "seed": seed}
    pipe.run(state)
    return state
