"""Hydra sweeps, one process and two ranks: one directory per job under one sweep
directory, work shared across jobs, the same numbers from both launches, the summary."""

import csv
import json
import os
import subprocess
import sys

import pytest
from conftest import TINY, word_tokenizer
from ranks import run as ranks_run

from distprune.config import ModelConfig
from distprune.models import load

JOBS = {f"prune.method={m},prune.sparsity={s}" for m in ("magnitude", "wanda") for s in (0.3, 0.6)}


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory, corpus):
    """The same 2 x 2 sweep (global scope: the 2-rank run selects with collectives), once
    per world size, each with its own statistics cache."""
    valid, test = corpus / "wikitext-2" / "valid.txt", corpus / "wikitext-2" / "test.txt"
    root = tmp_path_factory.mktemp("sweep")
    ckpt = root / "tiny-ckpt"
    load(ModelConfig(random=dict(TINY["llama"]))).model.save_pretrained(ckpt)
    word_tokenizer(valid.read_text()).save_pretrained(ckpt)
    done = {}
    for ranks in (1, 2):
        cwd = root / f"ws{ranks}"
        cwd.mkdir()
        launcher = ([sys.executable] if ranks == 1 else
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)])
        p = ranks_run([*launcher, "-m", "distprune", "-m", "model=hf", f"model.path={ckpt}",
                       "prune.method=magnitude,wanda", "prune.sparsity=0.3,0.6", "prune.scope=global",
                       "prune.mode=oneshot", f"calib.source={valid}", "calib.nsamples=4", "calib.seqlen=32",
                       f"eval.source={test}", "eval.seqlen=32", "eval.max_windows=4", "save=false"],
                      fresh=[cwd / "sweeps"], cwd=cwd, timeout=600,
                      env={**os.environ, "DISTPRUNE_CACHE": str(root / f"cache{ranks}")})
        assert p.returncode == 0, p.stderr[-3000:]
        sweep_dir = cwd / "sweeps" / "tiny-ckpt"  # sweeps/<model.name>; model=hf names it after the directory
        reports = {d.name: json.loads((d / "distprune_report.json").read_text())
                   for d in sweep_dir.iterdir() if d.is_dir()}
        done[ranks] = sweep_dir, reports, p.stderr
    return done


@pytest.mark.parametrize("ranks", [1, 2])
def test_one_directory_per_job_under_the_sweep_directory(sweeps, ranks):
    sweep_dir, reports, _ = sweeps[ranks]
    assert set(reports) == JOBS  # named by the swept values; no per-rank or numbered directories
    assert {p.name for p in sweep_dir.iterdir() if p.is_file()} == {
        "multirun.yaml", "summary.csv", "summary.md", "summary.png"}
    for name, r in reports.items():
        assert r["world_size"] == ranks
        assert f"prune.method={r['method']},prune.sparsity={r['target_sparsity']}" == name
        assert not (sweep_dir / name / "model.safetensors").exists()  # save=false: the report only


@pytest.mark.parametrize("ranks", [1, 2])
def test_work_is_shared_across_jobs(sweeps, ranks):
    """The model is loaded once, wanda's statistics computed once, the dense model evaluated once."""
    _, reports, stderr = sweeps[ranks]
    # a safetensors checkpoint is streamed; later jobs read their resident weights again
    assert sorted(r["load"]["mode"] for r in reports.values()) == ["reused", "reused", "reused", "streamed"]
    assert sorted(r["stats_cache"] for r in reports.values() if r["method"] == "wanda") == ["hit", "miss"]
    assert stderr.count("cache miss") == 1
    assert sorted("eval_dense" in r["seconds"] for r in reports.values()) == [False, False, False, True]
    assert len({r["perplexity"]["dense"] for r in reports.values()}) == 1
    for num in range(4):  # a line per job as it starts, the first one's too
        assert f"#{num} : " in stderr


def test_one_process_and_two_ranks_give_the_same_numbers(sweeps):
    one, two = sweeps[1][1], sweeps[2][1]
    for job in JOBS:
        a, b = one[job], two[job]
        assert a["layers"] == b["layers"] and a["threshold"] == b["threshold"], job
        assert a["pruned_weights"] == b["pruned_weights"] and a["achieved_sparsity"] == b["achieved_sparsity"]
        assert a["perplexity"] == b["perplexity"], job  # the same batches, summed in the same order


@pytest.mark.parametrize("ranks", [1, 2])
def test_summary_at_the_end_and_rebuilt(sweeps, ranks):
    sweep_dir, reports, _ = sweeps[ranks]
    with open(sweep_dir / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["method"], float(r["target_sparsity"])) for r in table] == [
        ("magnitude", 0.3), ("magnitude", 0.6), ("wanda", 0.3), ("wanda", 0.6)]
    assert {r["job"] for r in table} == JOBS and all(r["world_size"] == str(ranks) for r in table)
    for r in table:
        assert float(r["perplexity"]) == pytest.approx(reports[r["job"]]["perplexity"]["pruned"], rel=1e-4)
    assert (sweep_dir / "summary.md").read_text().count("\n") == 2 + len(JOBS)
    assert (sweep_dir / "summary.png").stat().st_size > 10000
    # an interrupted sweep gets its summary from the reports alone: the same table
    written = (sweep_dir / "summary.csv").read_text()
    (sweep_dir / "summary.csv").unlink()
    s = subprocess.run([sys.executable, "-m", "distprune.summarize", str(sweep_dir)], capture_output=True, text=True,
                       timeout=120)
    assert s.returncode == 0, s.stderr
    assert (sweep_dir / "summary.csv").read_text() == written


def test_summarize_without_reports_fails(tmp_path):
    p = subprocess.run([sys.executable, "-m", "distprune.summarize", str(tmp_path)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode != 0 and "no distprune_report.json" in p.stderr


def test_sweep_and_job_names_come_from_the_command_line():
    from distprune.sweep import sweep_job_dir, sweep_name

    argv = ["-m", "model=hf", "model.path=/m/a,/m/b.gguf", "prune.sparsity=0.3,0.5", "save=false"]
    assert sweep_name("ignored", argv) == "a+b"  # the same for every job: not the job's own model
    assert sweep_name("smollm2-135m", ["-m", "prune.sparsity=0.3,0.5"]) == "smollm2-135m"
    job = ["model=hf", "model.path=/m/a", "prune.sparsity=0.5", "save=false"]
    assert sweep_job_dir(job, argv, 3) == "model.path=_m_a,prune.sparsity=0.5"  # swept keys only
    assert sweep_job_dir(["save=false"], ["-m", "save=false"], 3) == "job3"  # nothing swept
    long = "/m/" + "x" * 300
    name = sweep_job_dir([f"model.path={long}"], ["-m", f"model.path={long},/m/b"], 0)
    assert name.startswith("job0-") and len(name) < 30


def test_summary_of_several_models(tmp_path):
    """A sweep over models: a model column, one line and one dense reference per model."""
    from distprune import summarize

    for model, dense in (("a", 20.0), ("b", 30.0)):
        for sparsity in (0.3, 0.6):
            job = tmp_path / f"model={model},prune.sparsity={sparsity}"
            job.mkdir()
            report = {"model": f"/m/{model}", "method": "wanda", "scope": "row", "selector": "row-kthvalue",
                      "mode": "oneshot", "target_sparsity": sparsity, "achieved_sparsity": sparsity,
                      "perplexity": {"dense": dense, "pruned": dense * (1 + sparsity)}, "seconds": {"load": 1.0},
                      "world_size": 1, "config": {"model": {"name": model}}}
            (job / "distprune_report.json").write_text(json.dumps(report))
    table = summarize.write(tmp_path)
    assert [(r["model"], r["target_sparsity"]) for r in table] == [("a", 0.3), ("a", 0.6), ("b", 0.3), ("b", 0.6)]
    assert (tmp_path / "summary.png").stat().st_size > 10000


def test_picture_lines_name_what_differs():
    """Lines are named by the settings that differ; a selector that the scope implies (row,
    N:M) and magnitude's missing mode are left out; what every job shares is the title."""
    from distprune.summarize import series

    def row(method, scope, selector, mode, ppl):
        return {"model": "smol", "method": method, "scope": scope, "selector": selector, "mode": mode,
                "target_sparsity": 0.5, "perplexity": ppl}

    table = [row("magnitude", "n:4", "nm-kthvalue", "-", 900.0),
             row("wanda", "n:4", "nm-kthvalue", "sequential", 90.0),
             row("wanda", "row", "row-kthvalue", "sequential", 50.0),
             row("wanda", "global", "radix", "sequential", 60.0)]
    title, lines = series(table)
    assert title == "smol, mode sequential, selector radix"  # the one selector that is not implied
    labels = sorted(label for label, _, _ in lines)
    assert labels == ["magnitude, n:4", "wanda, global", "wanda, n:4", "wanda, row"]
    assert lines["wanda, n:4", "wanda, n:4", "smol"] == [(0.5, 90.0)]


def test_default_output_dir_names_the_scope():
    """2:4 and 4:8 at the same sparsity get different default output directories."""
    from hydra import compose, initialize_config_dir

    from distprune.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        nm = compose("config", overrides=["prune=wanda-2of4", "prune.m=8"])
        row = compose("config", overrides=["prune.method=magnitude"])
    assert nm.output_dir == "outputs/smollm2-135m-wanda-nm8-0.5"
    assert row.output_dir == "outputs/smollm2-135m-magnitude-row-0.5"


def test_a_sweep_that_stops_early_has_the_summary_of_its_finished_jobs(tmp_path):
    p = subprocess.run([sys.executable, "-m", "distprune", "-m", "model=tiny-llama", "prune.method=magnitude",
                        "prune.sparsity=0.3,1.5", "save=false"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2 and "prune.sparsity=1.5 is outside [0, 1)" in p.stderr
    sweep_dir = tmp_path / "sweeps" / "tiny-llama"
    assert sorted(d.name for d in sweep_dir.iterdir() if d.is_dir()) == ["prune.sparsity=0.3"]
    with open(sweep_dir / "summary.csv") as f:
        assert [r["target_sparsity"] for r in csv.DictReader(f)] == ["0.3"]


def test_an_unreadable_old_report_does_not_stop_a_sweep(tmp_path):
    old = tmp_path / "sweeps" / "tiny-llama" / "old-job"
    old.mkdir(parents=True)
    (old / "distprune_report.json").write_text("{")  # e.g. a job killed while it wrote
    p = subprocess.run([sys.executable, "-m", "distprune", "-m", "model=tiny-llama", "prune.method=magnitude",
                        "prune.sparsity=0.3,0.5", "save=false"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("not written: JSONDecodeError") == 3  # after each job and at the end
    assert (old.parent / "prune.sparsity=0.5" / "distprune_report.json").is_file()


def test_method_as_a_swept_key(tmp_path):
    """Score and solve methods in one sweep: each job starts from the dense weights, the
    summary has one row per method, and sparsegpt's report carries its solve."""
    p = subprocess.run([sys.executable, "-m", "distprune", "-m", "model=tiny-llama", "prune.method=wanda,ria,sparsegpt",
                        "prune.scope=nm", "calib.nsamples=4", "calib.seqlen=32", "save=false"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    sweep_dir = tmp_path / "sweeps" / "tiny-llama"
    with open(sweep_dir / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["method"] for r in rows) == ["ria", "sparsegpt", "wanda"]
    assert all(r["achieved_sparsity"] == "0.5" for r in rows)
    reports = {m: json.loads((sweep_dir / f"prune.method={m}" / "distprune_report.json").read_text())
               for m in ("wanda", "ria", "sparsegpt")}
    assert "solve" in reports["sparsegpt"] and "solve" not in reports["wanda"]
    assert all(r["model_reused"] for m, r in reports.items() if m != "wanda")  # one load, dense weights restored
    assert reports["sparsegpt"]["selector"] == "sparsegpt-nm"
