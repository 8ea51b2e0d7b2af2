"""`pip install .` gives a working tool: the wheel carries the Hydra configs, and the
installed package runs from any directory."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_runs_from_anywhere(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("distprune", "conf"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    wheel = next((tmp_path / "dist").glob("distprune-*.whl"))
    site = tmp_path / "site"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}

    def distprune(*args):
        return subprocess.run([sys.executable, "-m", "distprune", *args], cwd=elsewhere, capture_output=True,
                              text=True, timeout=300, env=env)

    where = subprocess.run([sys.executable, "-c", "import distprune; print(distprune.__file__)"], cwd=elsewhere,
                           capture_output=True, text=True, env=env)
    assert where.stdout.strip() == str(site / "distprune" / "__init__.py")  # the installed copy, not the checkout
    job = distprune("--cfg", "job", "--resolve")
    assert job.returncode == 0, job.stderr
    assert "name: smollm2-135m" in job.stdout and "method: wanda" in job.stdout
    p = distprune("model=tiny-llama", "prune=wanda-2of4", "calib.nsamples=4", "calib.seqlen=32", "output_dir=out")
    assert p.returncode == 0, p.stderr
    assert (elsewhere / "out" / "model.safetensors").is_file()
    # the console commands ([project.scripts]) run the same apps
    p = subprocess.run([str(site / "bin" / "distprune"), "model=tiny-llama", "prune.method=magnitude", "output_dir=o2"],
                       cwd=elsewhere, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    assert (elsewhere / "o2" / "model.safetensors").is_file()
    p = subprocess.run([str(site / "bin" / "distprune-eval"), "model=hf", "model.path=o2"], cwd=elsewhere,
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 2 and "eval.source is not set" in p.stderr.strip().splitlines()[-1], p.stderr
