"""Launching ranks with torchrun from the tests.

gloo's TCP transport now and then loses a connection between live ranks on this 2-core
machine when it is loaded: a rank's collective ends in "[gloo/transport/tcp/pair.cc:N]
Connection closed by peer" (or a rank aborts in gloo's C++, "terminate called ..."), in
a job that passes when launched again. PyTorch's own gloo tests have the same flakes
(pytorch/pytorch#16941, #53270, #57469). CI saw it twice in one run, in two 3-rank
launches of tests/test_distributed.py (no other rank had failed; the peers were alive
until torchrun ended them). ``run`` launches once more when, and only when, a launch that
should succeed fails with that signature, and says so in a pytest warning; any other
failure, or a second one, fails the test as before.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import warnings
from collections.abc import Sequence
from pathlib import Path

GLOO_TRANSPORT = re.compile(r"gloo/transport/tcp/pair\.cc:\d+\] [^\n]*(closed by peer|reset by peer)"
                            r"|terminate called")


def transport_failure(p: subprocess.CompletedProcess) -> str | None:
    """The line of a failed torchrun launch that shows gloo's transport failing, if any."""
    if p.returncode == 0:
        return None
    m = GLOO_TRANSPORT.search(p.stderr or "")
    if m is None:
        return None
    start = p.stderr.rfind("\n", 0, m.start()) + 1
    end = p.stderr.find("\n", m.end())
    return p.stderr[start:end if end >= 0 else None].strip()


def run(cmd: Sequence[str], *, fresh: Sequence[Path] = (), **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True, **kwargs) for a launch that
    should succeed. A torchrun launch that fails on gloo's transport runs once more, after
    removing ``fresh`` (the directories the launch writes, which a sweep fills job by job)."""
    cmd = [str(c) for c in cmd]
    p = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    line = transport_failure(p) if "torch.distributed.run" in cmd else None
    if line is not None:
        warnings.warn(f"gloo transport failure, launching again once: {line}", stacklevel=2)
        for d in fresh:
            shutil.rmtree(d, ignore_errors=True)
        p = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    return p


def why(p: subprocess.CompletedProcess) -> str:
    """What a failed launch says: each rank's error lines, then the end of stderr."""
    errors = [line for line in p.stderr.splitlines() if " ERROR" in line or "Error:" in line][:20]
    return "\n".join([*errors, "...", p.stderr[-2000:]])


def jobs(root: Path, named: dict[str, Sequence[str]]) -> list[str]:
    """Hydra arguments that run ``named`` (job name -> its key=value settings) as one sweep,
    one launch for jobs that no single grid holds (different keys, models or presets): each
    job becomes an option of a config group ``job`` in a search-path folder beside root
    (ROOT-jobs: a launch run again removes root first, ``run``), and writes to output_dir
    ROOT/NAME. They begin with -m: put them before other settings. A
    launch costs seconds of start-up (interpreter, torch, torchrun); a job of a tiny model,
    a fraction of that."""
    from omegaconf import OmegaConf

    folder = root.with_name(f"{root.name}-jobs")
    (folder / "job").mkdir(parents=True, exist_ok=True)
    for name, settings in named.items():
        if "/" in name or "," in name:
            raise ValueError(f"job name {name!r}: no '/' or ','")
        body = OmegaConf.to_yaml(OmegaConf.from_dotlist(list(settings)))
        (folder / "job" / f"{name}.yaml").write_text("# @package _global_\n" + body)
    return ["-m", f"hydra.searchpath=[file://{folder}]", "+job=" + ",".join(named),
            f"output_dir={root}/${{hydra:runtime.choices.job}}"]
