"""The package's shape (issue 29): imports flow one way, and config, the leaf every module may
import, holds plain name lists that the registries implementing them agree with."""

import ast
from pathlib import Path

import distprune.config as config
from distprune.methods import METHODS

PACKAGE = Path(__file__).resolve().parent.parent / "distprune"


def imports() -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports: at the top, inside
    functions and under TYPE_CHECKING alike."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    graph = {}
    for name in modules:
        found = set()
        for node in ast.walk(ast.parse((PACKAGE / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "distprune":
                found |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("distprune."):
                found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("distprune.")}
        graph[name] = found - {name}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        path.pop()
        state[v] = 2
        return None

    return next((c for v in sorted(graph) if v not in state and (c := visit(v))), None)


def test_no_import_cycle():
    assert cycle(imports()) is None


def test_the_cycle_finder_finds_one():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_config_is_a_leaf():
    assert imports()["config"] <= {"errors"}


def test_config_names_what_the_method_registry_implements():
    assert tuple(METHODS) == config.METHOD_NAMES
    assert tuple(n for n, m in METHODS.items() if m.solve is not None) == config.SOLVES
    for name, method in METHODS.items():
        assert method.options == config.METHOD_OPTIONS[name], name
        assert method.scopes == (config.SOLVE_SCOPES if name in config.SOLVES else config.SCOPES), name
    assert set(config.OPTIONS) <= set(config.PruneConfig.__dataclass_fields__)
