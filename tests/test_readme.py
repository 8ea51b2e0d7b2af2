"""Every distprune command in the README composes into settings that pass their checks
(a renamed key, a preset that is gone or a setting that is now refused fails here)."""

import itertools
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from distprune.cli import CONF_DIR
from distprune.config import Config

ROOT = Path(__file__).resolve().parent.parent


DOCS = ("README.md", "docs/USAGE.md")


def readme_commands() -> list[list[str]]:
    """The arguments after `-m distprune` (or `-m distprune.eval`) of every command in the
    README's and docs/USAGE.md's code blocks and inline code, continuation lines joined."""
    text = "\n".join(ROOT.joinpath(name).read_text() for name in DOCS)
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S) + re.findall(r"`([^`\n]*-m distprune[^`\n]*)`", text)
    commands = []
    for block in blocks:
        variables = {}  # VAR="..." lines of the block, expanded in the commands after them as the shell does
        for raw in block.replace("\\\n", " ").splitlines():
            if raw.strip().startswith("#"):  # a comment line
                continue
            assigned = re.fullmatch(r'([A-Z_][A-Z0-9_]*)="([^"]*)"', raw.strip())
            if assigned:
                variables[assigned[1]] = assigned[2]
                continue
            line = raw
            for name, value in variables.items():
                line = re.sub(rf"\${name}\b", value, line)
            for part in line.split("  #")[0].split("&&"):
                words = shlex.split(part)
                for i in range(len(words) - 1):
                    if words[i] == "-m" and words[i + 1] in ("distprune", "distprune.eval"):
                        commands.append(words[i + 2:])
    return commands


def combinations(args: list[str]) -> list[list[str]]:
    """One override list per job: a sweep (-m) expands its comma-separated values."""
    if "-m" not in args:
        return [[a for a in args if a != "..."]]
    overrides = [a for a in args if a not in ("-m", "...")]
    choices = [[f"{a.split('=', 1)[0]}={v}" for v in a.split("=", 1)[1].split(",")] if "," in a else [a]
               for a in overrides]
    return [list(c) for c in itertools.product(*choices)]


COMMANDS = readme_commands()


def test_the_readme_has_commands():
    assert len(COMMANDS) >= 10


def test_the_readme_is_short():
    """A page a newcomer reads: what, set-up, recipes, one table; the reference is docs/USAGE.md."""
    assert len(ROOT.joinpath("README.md").read_text().encode()) <= 12 * 1024


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_readme_command_composes_and_passes_its_checks(args):
    for overrides in combinations(args):
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            cfg = OmegaConf.to_object(compose("config", overrides=overrides))
        assert isinstance(cfg, Config)
        cfg.check()
