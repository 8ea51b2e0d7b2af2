"""The output directory is never clobbered, and nothing temporary is left behind: jobs
racing for one output_dir, signals and killed ranks mid-save, leftovers of killed runs."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import distprune.checkpoint as checkpoint
import distprune.writer as writer
from distprune.cli import run
from distprune.config import ConfigError

HERE = Path(__file__).resolve().parent


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_job_finishing_second_never_replaces_the_first(tiny, monkeypatch):
    """Another job fills output_dir while this one writes: this one fails (exit 2 from the
    CLI), the other's checkpoint stays; with overwrite=true it is replaced."""
    cfg = tiny()
    out = Path(cfg.output_dir)
    original = writer.write_checkpoint

    def other_job_finishes_first(directory, *args, **kwargs):
        original(directory, *args, **kwargs)
        out.mkdir(exist_ok=True)
        (out / "model.safetensors").write_text("the other job's checkpoint")

    monkeypatch.setattr(writer, "write_checkpoint", other_job_finishes_first)
    with pytest.raises(ConfigError, match="was filled by another job while this one ran") as e:
        run(cfg)
    assert "\n" not in str(e.value)
    assert (out / "model.safetensors").read_text() == "the other job's checkpoint"
    assert leftovers(out.parent) == []
    cfg.overwrite = True
    run(cfg)
    assert (out / "model.safetensors").read_bytes()[:8] != b"the othe"
    assert leftovers(out.parent) == []


def test_two_processes_racing_for_one_output_dir(tmp_path):
    """Started together without overwrite: one writes the checkpoint, the other exits 2
    (at the start or at the final rename), and the checkpoint is complete."""
    cmd = [sys.executable, "-m", "distprune", "model=tiny-llama", "prune=magnitude", f"output_dir={tmp_path / 'out'}"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "is not empty" in loser or "was filled by another job" in loser
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "distprune_report.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    assert leftovers(tmp_path) == []


def stall(tmp_path: Path, ranks: int, stall_rank: int) -> tuple[subprocess.Popen, Path, Path]:
    """Launch a magnitude job whose rank ``stall_rank`` stops after writing its files;
    returns once it has stopped there (the temporary directory holds files)."""
    pidfile = tmp_path / "stalled.pid"
    script = [str(HERE / "helpers" / "stall_in_save.py")]
    launcher = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    out = tmp_path / "run" / "pruned"
    out.parent.mkdir()
    env = {**os.environ, "DISTPRUNE_TEST_STALL_RANK": str(stall_rank), "DISTPRUNE_TEST_PIDFILE": str(pidfile)}
    proc = subprocess.Popen([*launcher, *script, "model=tiny-llama", "prune=magnitude", "prune.scope=global",
                             f"output_dir={out}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not pidfile.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() - t0 < 180
        time.sleep(0.2)
    tmp = [p for p in out.parent.iterdir() if ".tmp-" in p.name]
    assert len(tmp) == 1 and any(tmp[0].iterdir())  # mid-save: files are there
    return proc, pidfile, out


def test_sigterm_mid_save_removes_the_temporary_directory(tmp_path):
    proc, pidfile, out = stall(tmp_path, 1, 0)
    os.kill(int(pidfile.read_text()), signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == "distprune: terminated (SIGTERM)"  # one line, like Ctrl-C's
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("victim", [0, 1])
def test_killed_rank_mid_save_leaves_nothing(tmp_path, victim):
    """kill -9 of one of three ranks after every rank wrote its shard: the others remove
    the temporary directory on their way out."""
    proc, pidfile, out = stall(tmp_path, 3, victim)
    t0 = time.monotonic()
    os.kill(int(pidfile.read_text()), signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 60
    assert list(out.parent.iterdir()) == []


def test_leftovers_of_killed_runs_are_removed(tiny, tmp_path):
    """A temporary directory whose owner process is gone (kill -9) is removed by the next
    run into the same output_dir; one of a live process is kept. An old output whose
    owner died between its two renames is first restored as output_dir (test_integrity),
    which this run, with overwrite, then replaces."""
    cfg = tiny()
    cfg.overwrite = True
    out = Path(cfg.output_dir)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = checkpoint.owner_token().rsplit("-", 1)[0]
    stale = [out.with_name(f".{out.name}.tmp-{host}-{dead.pid}"), out.with_name(f".{out.name}.old-{host}-{dead.pid}")]
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    live = out.with_name(f".{out.name}.tmp-{host}-{alive.pid}")
    elsewhere = out.with_name(f".{out.name}.tmp-otherhost-{dead.pid}")  # a shared file system: not ours to judge
    for d in [*stale, live, elsewhere]:
        d.mkdir()
        (d / "model.safetensors").write_text("x")
    try:
        run(cfg)
    finally:
        alive.kill()
    assert (out / "model.safetensors").is_file()
    assert leftovers(out.parent) == sorted([live.name, elsewhere.name])


def test_ctrl_c_under_torchrun_one_line_per_rank(tmp_path):
    """Ctrl-C (SIGINT to the whole process group) mid-save: each rank says so in one line,
    no rank prints a traceback, nothing is left behind. (torchrun itself still prints its
    own SignalException traceback: the launcher's, not distprune's.)"""
    pidfile = tmp_path / "stalled.pid"
    out = tmp_path / "run" / "pruned"
    out.parent.mkdir()
    env = {**os.environ, "DISTPRUNE_TEST_STALL_RANK": "0", "DISTPRUNE_TEST_PIDFILE": str(pidfile)}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(HERE / "helpers" / "stall_in_save.py"), "model=tiny-llama", "prune=magnitude",
                             f"output_dir={out}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    t0 = time.monotonic()
    while not pidfile.exists():
        assert proc.poll() is None and time.monotonic() - t0 < 180
        time.sleep(0.2)
    time.sleep(1)  # rank 1 waits in the barrier after its save
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert stderr.count("distprune rank 0: interrupted") == 1 and stderr.count("distprune rank 1: interrupted") == 1
    assert "KeyboardInterrupt" not in stderr
    assert f'File "{HERE.parent / "distprune"}' not in stderr  # no frame of ours in any traceback
    assert list(out.parent.iterdir()) == []
