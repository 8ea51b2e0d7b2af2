"""Tiny random-weight models built from transformers configs: no download, a second each."""

import pytest

from distprune.config import Config, ModelConfig, PruneConfig

TINY = {
    "llama": dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=160,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256),
    "gpt2": dict(model_type="gpt2", vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=256),
}


def tiny_config(tmp_path, arch: str = "llama", output: str = "out", **prune) -> Config:
    return Config(
        model=ModelConfig(name=f"tiny-{arch}", random=dict(TINY[arch]), seed=0),
        prune=PruneConfig(**prune),
        output_dir=str(tmp_path / output),
        device="cpu",
    )


@pytest.fixture
def tiny(tmp_path):
    return lambda **kw: tiny_config(tmp_path, **kw)
