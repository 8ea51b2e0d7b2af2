"""Every tensor distprune makes is placed explicitly (issue 28): with torch's default device
set to meta, a tensor created without a device lands on meta, and mixing it with the CPU
inputs fails or gives no numbers. That is the class of bug that breaks a GPU run (a CPU
tensor beside CUDA ones), caught on a machine without one. Each job must give the same
weights and perplexity as with the default device left alone."""

import pytest
import torch
from conftest import TINY

from distprune import PruneConfig, prune
from distprune.api import calibrate_and_prune
from distprune.config import ModelConfig
from distprune.layers import prunable_layers
from distprune.models import load
from distprune.perplexity import blockwise_perplexity, perplexity
from distprune.stats import LayerStats

WINDOWS = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))


def model():
    return load(ModelConfig(random=dict(TINY["llama"]), seed=0)).model


def weights(m) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def on_meta_default(job):
    """job() with the default device meta, and what it returns and leaves in the model."""
    torch.set_default_device("meta")
    try:
        return job()
    finally:
        torch.set_default_device(None)


def stats_for(m) -> dict[str, LayerStats]:
    g = torch.Generator().manual_seed(1)
    return {layer.name: LayerStats.from_norms(torch.rand(layer.weight.shape[1], generator=g) + 0.1)
            for layer in prunable_layers(m)}


DIRECT = [
    dict(method="magnitude", scope="row"),
    dict(method="magnitude", scope="layer", selector="sort"),
    dict(method="magnitude", scope="global", selector="radix"),
    dict(method="magnitude", scope="global", selector="search"),
    dict(method="wanda", scope="global", normalize="row"),
    dict(method="wanda", scope="nm", sparsity=0.5),
    dict(method="ria", scope="row"),
    dict(method="wanda", scope="row", allocation="owl", sparsity=0.6),
    dict(method="wanda", scope="row", allocation="global"),
]


@pytest.mark.parametrize("settings", DIRECT, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_scores_selectors_and_masks_place_every_tensor(settings):
    expect, got = model(), model()
    stats = stats_for(expect)
    prune(expect, PruneConfig(**settings), stats, show_progress=False)
    on_meta_default(lambda: prune(got, PruneConfig(**settings), stats, show_progress=False))
    for k, v in weights(expect).items():
        assert torch.equal(got.state_dict()[k], v), k


CALIBRATED = [
    dict(method="wanda", scope="row", mode="oneshot"),
    dict(method="wanda", scope="row", mode="sequential"),
    dict(method="sparsegpt", scope="row"),
    dict(method="sparsegpt", scope="nm", sparsity=0.5),
    dict(method="alps", scope="row", alps_max_iter=20),
    dict(method="wanda", scope="row", refit=True),
]


@pytest.mark.parametrize("settings", CALIBRATED, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_statistics_and_solves_place_every_tensor(settings):
    expect, got = model(), model()
    calibrate_and_prune(expect, PruneConfig(**settings), lambda: WINDOWS, "cpu", prunable_layers(expect), 2,
                        show_progress=False)
    on_meta_default(lambda: calibrate_and_prune(got, PruneConfig(**settings), lambda: WINDOWS, "cpu",
                                                prunable_layers(got), 2, show_progress=False))
    for k, v in weights(expect).items():
        assert torch.equal(got.state_dict()[k], v), k


def test_perplexity_loops_place_every_tensor():
    m = model()
    whole, blockwise = perplexity(m, WINDOWS, 2, show=False), blockwise_perplexity(m, WINDOWS, 2, "cpu")
    assert on_meta_default(lambda: perplexity(m, WINDOWS, 2, show=False)) == whole
    assert on_meta_default(lambda: blockwise_perplexity(m, WINDOWS, 2, "cpu")) == blockwise
