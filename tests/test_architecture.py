"""The shape of the code, checked on every run: the layers' import rules, lint, and the docs site.

The import graph comes from the source (``ast``), every import counted, lazy ones inside
functions too: a rule that only held at module level would not be a rule.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = "react_ray"
STAGES = ("embed", "index", "retrieve", "train", "evaluate")
BASE_LAYERS = ("react_ray.formats", "react_ray.models", "react_ray.fields")
# The jobs, the `react-ray` command that runs them, and the demo.
COMMANDS = ("react_ray.jobs", "react_ray.cli", "react_ray.demo")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(packages=(LIBRARY, "serve_apps")) -> dict[str, set[str]]:
    """{module: the project modules it imports}, from every ``import`` in its source."""
    modules = {module_name(p): p for package in packages for p in (ROOT / package).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets |= {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {t for t in targets if t in modules}
    return graph


def within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                pytest.fail(f"import cycle: {' -> '.join(path[path.index(target) :] + [target])}")
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_base_layers_import_no_stage_and_the_library_no_app_or_command():
    graph = import_graph()
    stages = [f"{LIBRARY}.{s}" for s in STAGES]
    broken = []
    for module, targets in graph.items():
        for target in targets:
            if within(module, BASE_LAYERS) and within(
                target, stages + ["react_ray.config", *COMMANDS]
            ):
                broken.append(f"{module} (a base layer) imports {target}")
            if within(module, stages) and within(target, ["serve_apps", *COMMANDS]):
                broken.append(f"{module} (a stage) imports {target}")
            if within(module, [LIBRARY]) and within(target, ["serve_apps"]):
                broken.append(f"{module} (the library) imports {target}")
    assert not broken, "\n".join(broken)


def test_the_rules_catch_what_they_forbid(tmp_path, monkeypatch):
    """The checks above, run on a small tree that breaks each rule once, report each break."""
    for package, files in {
        "react_ray": {"__init__.py": "", "cli.py": "def main():\n    import serve_apps.w\n"},
        "react_ray/formats": {
            "__init__.py": "",
            "x.py": "def f():\n    import react_ray.embed.y\n",
        },
        "react_ray/embed": {
            "__init__.py": "",
            "y.py": "from react_ray.formats import x\nimport serve_apps.z\n",
        },
        "serve_apps": {"__init__.py": "", "z.py": "from react_ray.formats import x\n", "w.py": ""},
    }.items():
        (tmp_path / package).mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (tmp_path / package / name).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(
        pytest.fail.Exception, match="import cycle: react_ray.embed.y -> react_ray.formats.x"
    ):
        test_the_import_graph_has_no_cycle()
    with pytest.raises(AssertionError) as broken:
        test_base_layers_import_no_stage_and_the_library_no_app_or_command()
    assert "react_ray.formats.x (a base layer) imports react_ray.embed.y" in str(broken.value)
    assert "react_ray.embed.y (a stage) imports serve_apps.z" in str(broken.value)
    assert "react_ray.cli (the library) imports serve_apps.w" in str(broken.value)


def test_serve_is_a_stage_the_apps_register():
    """``react-ray serve`` comes from serve_apps' entry point (pyproject), not an import in cli."""
    from react_ray.cli import LIBRARY_STAGES, STAGES

    assert "serve" not in LIBRARY_STAGES and STAGES["serve"].run.__module__ == "serve_apps.run"
    assert STAGES["serve"].config_type.__name__ == "ServeConfig"


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    return (
        str(path)
        if path.exists()
        else (shutil.which(name) or pytest.fail(f"{name} is not installed"))
    )


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff_is_clean(command):
    out = subprocess.run([_tool("ruff"), *command, "."], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]


def _build_docs(root: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_tool("mkdocs"), "build", "--strict", "-f", str(root / "mkdocs.yml"), "-d", str(site)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_docs_site_builds_strictly(tmp_path):
    out = _build_docs(ROOT, tmp_path / "site")
    assert out.returncode == 0, out.stderr[-6000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "EmbeddingSetInfo" in api and "IndexManifest" in api and "Resources" in api


@pytest.mark.parametrize(
    "breakage",
    [
        ("docs/index.md", "\n[gone](no-such-page.md)\n", "no-such-page.md"),
        ("docs/api.md", "\n::: react_ray.formats.no_such_module\n", "no_such_module"),
    ],
    ids=["broken link", "broken API reference"],
)
def test_a_broken_docs_link_or_reference_fails_the_build(tmp_path, breakage):
    page, text, named = breakage
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    (copy / "react_ray").symlink_to(ROOT / "react_ray")
    with open(copy / page, "a") as f:
        f.write(text)
    out = _build_docs(copy, tmp_path / "site")
    assert out.returncode != 0 and named in out.stderr
