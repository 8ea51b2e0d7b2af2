"""Zero-shot accuracy (eval.tasks) through lm-evaluation-harness, on a task the test writes:
the report's accuracies equal a hand computation of the same log-likelihoods."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from ranks import run as ranks_run
from ranks import why

from distprune import models, summarize, zeroshot
from distprune.cli import run
from distprune.config import CalibConfig, Config, ConfigError, EvalConfig, ModelConfig, PruneConfig

TASK = "distprune_tiny_mc"
# a tiny Llama whose blocks matter: with transformers' default init (0.02) the logits come from the
# embeddings and the head, and pruning the blocks leaves every answer as it was
RANDOM = dict(TINY["llama"], initializer_range=0.2)
DOCS = [  # choices of different lengths (acc and acc_norm differ), then 28 made up
    {"question": "The sky is", "choices": ["blue", "green grass", "red"], "label": 0},
    {"question": "Two plus two is", "choices": ["four", "five", "three hundred"], "label": 0},
    {"question": "Cats say", "choices": ["woof", "meow"], "label": 1},
    {"question": "Water is", "choices": ["dry", "wet", "sandy and hot"], "label": 1},
    {"question": "Fire is", "choices": ["cold as ice", "hot"], "label": 1},
    {"question": "A week has", "choices": ["seven days", "ten", "two"], "label": 0},
    {"question": "Snow is", "choices": ["black", "white", "purple with dots"], "label": 1},
    {"question": "The sun rises in the", "choices": ["west", "east", "north-north-west"], "label": 1},
    {"question": "Bees make", "choices": ["honey", "milk", "steel beams"], "label": 0},
    {"question": "Fish live in", "choices": ["trees", "deserts", "water"], "label": 2},
    {"question": "Ice is", "choices": ["frozen water", "warm"], "label": 0},
    {"question": "Birds can", "choices": ["fly", "swim under lava"], "label": 0},
    # equal lengths: a random model's log-likelihoods differ by their tokens, not by how many there are
    *({"question": f"Item {i} goes with", "choices": [f"{a}{i:02d}" for a in ("abc", "pqr", "xyz")], "label": i % 3}
      for i in range(28)),
]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A multiple-choice task in lm-eval's YAML format over a JSONL file: no hub needed."""
    d = tmp_path_factory.mktemp("tasks")
    (d / "docs.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (d / "tiny.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / "docs.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return d


@torch.no_grad()
def by_hand(model, tokenizer, docs=DOCS) -> dict[str, float]:
    """acc and acc_norm as lm-eval defines them for a multiple-choice task: the choice with
    the highest log-likelihood of " choice" after the question (acc_norm: divided by the
    choice's length in characters), first one on ties."""
    acc, norm = [], []
    for doc in docs:
        ctx = tokenizer(doc["question"], add_special_tokens=False)["input_ids"]
        lls = []
        for choice in doc["choices"]:
            cont = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ctx + cont])
            logp = torch.log_softmax(model(input_ids=ids[:, :-1]).logits.float(), -1)[0, len(ctx) - 1:]
            lls.append(float(logp.gather(1, torch.tensor(cont)[:, None]).sum()))
        acc.append(float(np.argmax(lls) == doc["label"]))
        norm.append(float(np.argmax(np.array(lls) / [len(c) for c in doc["choices"]]) == doc["label"]))
    return {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(norm))}


def loaded_from(path: Path):
    return models.load(ModelConfig(path=str(path)), "cpu")


def config(tmp_path: Path, task_dir: Path, model: ModelConfig, **kw) -> Config:
    return Config(model=model, prune=PruneConfig(method="magnitude"), calib=CalibConfig(nsamples=4, seqlen=16),
                  eval=EvalConfig(tasks=[TASK], task_path=str(task_dir)), output_dir=str(tmp_path / "out"),
                  device="cpu", **kw)


@pytest.fixture(scope="module")
def in_memory(tmp_path_factory, task_dir):
    """One job on a random tiny Llama (byte tokenizer), whole in memory."""
    tmp = tmp_path_factory.mktemp("zs")
    cfg = config(tmp, task_dir, ModelConfig(name="tiny-llama", random=dict(RANDOM)))
    return cfg, run(cfg)


def test_accuracies_of_the_dense_and_the_pruned_model_match_a_hand_computation(in_memory):
    cfg, report = in_memory
    zs = report["zeroshot"]
    dense = models.load(cfg.model, "cpu")
    assert zs["dense"][TASK] == by_hand(dense.model, dense.tokenizer)
    pruned = loaded_from(Path(cfg.output_dir))
    assert zs["pruned"][TASK] == by_hand(pruned.model, pruned.tokenizer)
    assert zs["mean_acc"] == {"dense": zs["dense"][TASK]["acc"], "pruned": zs["pruned"][TASK]["acc"]}
    assert zs["dense"] != zs["pruned"]  # so the comparisons above tell the two models apart
    assert report["seconds"]["zeroshot"] > 0 and report["seconds"]["zeroshot_dense"] > 0


def test_limit_takes_the_first_examples(in_memory, task_dir):
    cfg, _ = in_memory
    dense = models.load(cfg.model, "cpu")
    got = zeroshot.evaluate(dense.model, dense.tokenizer, [TASK], str(task_dir), 0, 5, 4)
    assert got[TASK] == by_hand(dense.model, dense.tokenizer, DOCS[:5])


def test_sweep_summary_has_the_accuracy_columns(in_memory, tmp_path):
    cfg, report = in_memory
    job = tmp_path / "sweep" / "prune.method=magnitude"
    job.mkdir(parents=True)
    shutil.copy(Path(cfg.output_dir) / "distprune_report.json", job)
    (row,) = summarize.write(tmp_path / "sweep")
    zs = report["zeroshot"]
    assert row["mean_acc"] == zs["mean_acc"]["pruned"] and row["dense_mean_acc"] == zs["mean_acc"]["dense"]
    assert row[f"{TASK}_acc"] == zs["pruned"][TASK]["acc"] and row[f"{TASK}_acc_norm"] == zs["pruned"][TASK]["acc_norm"]
    header = (tmp_path / "sweep" / "summary.csv").read_text().splitlines()[0].split(",")
    assert {"mean_acc", "dense_mean_acc", f"{TASK}_acc", f"{TASK}_acc_norm"} <= set(header)
    assert f"| {TASK}_acc |" in (tmp_path / "sweep" / "summary.md").read_text().replace(" | ", " |\n| ")


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    """A tiny random Llama saved as a safetensors checkpoint with its byte tokenizer: a model
    distprune streams (whole on no rank)."""
    d = tmp_path_factory.mktemp("ckpt")
    loaded = models.load(ModelConfig(random=dict(RANDOM), seed=3), "cpu")
    loaded.model.save_pretrained(d)
    loaded.tokenizer.save_pretrained(d)
    return d


def test_a_streamed_model_is_evaluated_from_the_input_and_the_written_checkpoint(tmp_path, task_dir, checkpoint_dir):
    cfg = config(tmp_path, task_dir, ModelConfig(name="ckpt", path=str(checkpoint_dir)))
    report = run(cfg)
    assert report["load"]["mode"] == "streamed"
    dense, pruned = loaded_from(checkpoint_dir), loaded_from(Path(cfg.output_dir))
    assert report["zeroshot"]["dense"][TASK] == by_hand(dense.model, dense.tokenizer)
    assert report["zeroshot"]["pruned"][TASK] == by_hand(pruned.model, pruned.tokenizer)


def test_a_streamed_model_without_save_is_refused_before_anything_is_written(tmp_path, task_dir, checkpoint_dir):
    cfg = config(tmp_path, task_dir, ModelConfig(name="ckpt", path=str(checkpoint_dir)), save=False)
    with pytest.raises(ConfigError, match="drop save=false"):
        run(cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, message", [
    ({"tasks": ["no_such_task_anywhere"]}, "lm-eval knows no task no_such_task_anywhere"),
    ({"task_path": "/nonexistent/tasks"}, "is not a directory"),
    ({"num_fewshot": -1}, "eval.num_fewshot=-1"),
    ({"tasks": [], "task_path": None, "limit": 3}, "eval.limit has no effect without eval.tasks"),
    ({"tasks": [], "task_path": "x"}, "eval.task_path has no effect without eval.tasks"),
])
def test_bad_zeroshot_settings_are_one_line_errors(tmp_path, task_dir, change, message):
    cfg = config(tmp_path, task_dir, ModelConfig(name="tiny-llama", random=dict(RANDOM)))
    for key, value in change.items():
        setattr(cfg.eval, key, value)
    with pytest.raises(ConfigError, match=message) as e:
        run(cfg)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_two_ranks_and_the_standalone_eval_give_the_accuracies_of_the_written_model(tmp_path, task_dir):
    """torchrun (2 ranks, gloo): rank 0 evaluates the whole model, pruned weights gathered
    from their owners; `python -m distprune.eval` gives the same numbers for the output."""
    out = tmp_path / "ranks"
    args = ["-m", "distprune", "model=tiny-llama", "+model.random.initializer_range=0.2", "prune.method=wanda",
            "calib.nsamples=4", "calib.seqlen=16",
            f"eval.tasks=[{TASK}]", f"eval.task_path={task_dir}", f"output_dir={out}", "device=cpu"]
    p = ranks_run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args],
                  fresh=[out], cwd=tmp_path, timeout=600)
    assert p.returncode == 0, why(p)
    report = json.loads((out / "distprune_report.json").read_text())
    assert report["world_size"] == 2
    pruned = loaded_from(out)
    assert report["zeroshot"]["pruned"][TASK] == by_hand(pruned.model, pruned.tokenizer)
    dense = models.load(ModelConfig(name="tiny-llama", random={**RANDOM, "max_position_embeddings": 1024}))
    assert report["zeroshot"]["dense"][TASK] == by_hand(dense.model, dense.tokenizer)

    p = subprocess.run([sys.executable, "-m", "distprune.eval", "model=hf", f"model.path={out}", f"eval.tasks=[{TASK}]",
                        f"eval.task_path={task_dir}", "device=cpu"], capture_output=True, text=True, cwd=tmp_path,
                       timeout=600, env=os.environ)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["zeroshot"] == report["zeroshot"]["pruned"]
    assert got["mean_acc"] == report["zeroshot"]["mean_acc"]["pruned"]
