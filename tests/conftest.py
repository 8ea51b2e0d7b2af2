"""Tiny random-weight models built from transformers configs: no download, a second each."""

import os
import tempfile
from pathlib import Path

import pytest

from distprune.config import CalibConfig, Config, ModelConfig, PruneConfig

TINY = {
    "llama": dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=160,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256),
    "mistral": dict(model_type="mistral", vocab_size=256, hidden_size=64, intermediate_size=160,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=256, sliding_window=None),
    "qwen2": dict(model_type="qwen2", vocab_size=256, hidden_size=64, intermediate_size=160,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256),
    "gpt_neox": dict(model_type="gpt_neox", vocab_size=256, hidden_size=64, intermediate_size=160,
                     num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256),
    "gpt_neo": dict(model_type="gpt_neo", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                    attention_types=[[["global", "local"], 1]], window_size=16, max_position_embeddings=256,
                    bos_token_id=0, eos_token_id=0),
    "opt": dict(model_type="opt", vocab_size=256, hidden_size=64, ffn_dim=160, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64),
    "gpt2": dict(model_type="gpt2", vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                 bos_token_id=0, eos_token_id=0),
}
# a launched rank that dies in C++ (SIGABRT, SIGSEGV) prints its Python stack into the
# stderr that a failing test shows
os.environ.setdefault("PYTHONFAULTHANDLER", "1")
# never the user's ~/.cache/distprune: one temporary cache for the whole run (the built-in
# model is converted into it once), inherited by every process a test launches and shared
# by pytest-xdist's workers (they inherit the controller's environment; conversions and
# cache files are written under a lock or renamed into place)
if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("DISTPRUNE_TEST_CACHE"):
    os.environ["DISTPRUNE_CACHE"] = os.environ["DISTPRUNE_TEST_CACHE"]
else:
    _CACHE = tempfile.TemporaryDirectory(prefix="distprune-test-cache-")
    os.environ["DISTPRUNE_CACHE"] = os.environ["DISTPRUNE_TEST_CACHE"] = _CACHE.name
# a worker's own computations share the cores with the other workers: torch threads per
# worker, not per core (a process a test launches gets torch's default again)
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
os.environ.pop("DISTPRUNE_DATA", None)  # presets resolve the same on every machine


def make_text(seed: int, words: int) -> str:
    """English-like text with a Zipf-distributed vocabulary and sentences of 5-20 words:
    what the tests need of a corpus (a word-level tokenizer, windows, perplexity), written
    by the test itself so that no data has to be on the machine."""
    import random

    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(600)]
    weights = [1 / (i + 1) for i in range(len(vocab))]
    out, n = [], 0
    while n < words:
        length = rng.randint(5, 20)
        out.append(" ".join(rng.choices(vocab, weights, k=length)) + " .")
        n += length + 1
    return "\n".join(out) + "\n"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A folder laid out like $DISTPRUNE_DATA: wikitext-2/valid.txt and test.txt."""
    root = tmp_path_factory.mktemp("data")
    (root / "wikitext-2").mkdir()
    (root / "wikitext-2" / "valid.txt").write_text(make_text(1, 40000))
    (root / "wikitext-2" / "test.txt").write_text(make_text(2, 20000))
    return root


def word_tokenizer(text: str, vocab_size: int = 256):
    """A word-level tokenizer over the most frequent words of text: a real tokenizer that
    fits the tiny models' vocabulary."""
    from collections import Counter

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [w for w, _ in Counter(text.split()).most_common(vocab_size - 2)]
    vocab = {"<s>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>")


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A tiny random Llama saved with a word-level tokenizer: a model directory that text
    sources and evaluation can use."""
    from distprune.models import load

    def make(arch: str = "llama", text: str = "the cat sat on the mat . " * 50) -> Path:
        directory = tmp_path / f"ckpt-{arch}"
        load(ModelConfig(random=dict(TINY[arch]))).model.save_pretrained(directory)
        word_tokenizer(text).save_pretrained(directory)
        return directory

    return make


def tiny_config(tmp_path, arch: str = "llama", output: str = "out", **prune) -> Config:
    prune.setdefault("method", "magnitude")
    return Config(
        model=ModelConfig(name=f"tiny-{arch}", random=dict(TINY[arch]), seed=0),
        prune=PruneConfig(**prune),
        calib=CalibConfig(nsamples=4, seqlen=16),
        output_dir=str(tmp_path / output),
        device="cpu",
    )


@pytest.fixture
def tiny(tmp_path):
    return lambda **kw: tiny_config(tmp_path, **kw)
