"""The installed package is the whole tree, and the services do not import each other in circles."""

from __future__ import annotations

import ast
import os
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("common", "kernels", "services", "proto")


def test_every_subpackage_is_in_the_installed_package_list():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for top in FOLDERS:
        for dirpath, _, files in os.walk(ROOT / top):
            if "__init__.py" in files and "__pycache__" not in dirpath:
                found.add("pdserve." + str(Path(dirpath).relative_to(ROOT)).replace(os.sep, "."))
    assert found == listed, f"missing from pyproject.toml: {sorted(found - listed)}; stale: {sorted(listed - found)}"


def _imports(path: Path) -> set[str]:
    """pdserve.* modules a file imports at module level or in functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pdserve."):
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("pdserve."))
    return names


def test_no_import_cycles_between_service_modules():
    modules = {}
    for path in (ROOT / "services").rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        name = "pdserve." + ".".join(rel.parts).removesuffix(".__init__")
        modules[name] = path
    graph = {m: {d for d in _imports(p) if d in modules and d != m} for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[m] = 2
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def _fenced_bash(text: str) -> list[str]:
    blocks, inside = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = line.strip() == "```bash"
            continue
        if inside:
            blocks.append(line)
    return blocks


def test_ci_runs_the_readme_test_command_with_ucx_and_a_cpu_install_pulls_no_cuda_torch():
    readme = _fenced_bash((ROOT / "README.md").read_text())
    test_command = next(line for line in readme if line.endswith("python -m pytest -q"))
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()
    assert sum(1 for line in readme if line.startswith("python3 -m venv .venv")) == 2  # two copy-paste commands
    # without nvidia-smi: the CPU wheel of torch; the UCX transport is tested (over tcp) everywhere
    assert "else pip install --no-deps torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in test_command
    assert 'pip install -e ".[test,ucx]"' in test_command
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if "cu1" in d or d.startswith(("ucx", "rmm", "libucx", "cupy"))]
    assert any(d.startswith("ucxx") for d in project["optional-dependencies"]["ucx"])


def test_the_checkout_root_on_sys_path_does_not_shadow_the_kernels_distribution():
    """`python -c` / `python -m` run from the checkout's root find its `kernels/` folder first;
    transformers (5.25 and later) imports the `kernels` distribution by that name. The folder hands
    the import over, and pdserve's own kernels stay `pdserve.kernels`."""
    import importlib.metadata
    import subprocess
    import sys
    try:
        importlib.metadata.version("kernels")
        installed = True
    except importlib.metadata.PackageNotFoundError:
        installed = False
    code = ("import sys, kernels, pdserve.kernels as own; import transformers.activations; "
            "print(kernels.__file__); print(own.__file__); print(sys.path[0])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    top, own, first = proc.stdout.split("\n")[:3]
    assert Path(first or os.curdir).resolve() == ROOT  # the situation under test: the root comes first
    assert Path(own).resolve() == ROOT / "kernels" / "__init__.py"
    if installed:
        assert not Path(top).resolve().is_relative_to(ROOT / "kernels")
        assert "CUDAProperties" in subprocess.run(
            [sys.executable, "-c", "import kernels; print(dir(kernels))"], cwd=ROOT, capture_output=True,
            text=True, timeout=120).stdout


def test_the_kernels_keep_triton_fp_fusion_on_unless_the_user_chose():
    import subprocess
    import sys
    code = "import os, pdserve.kernels; print(os.environ['TRITON_DEFAULT_FP_FUSION'])"
    for given, expected in ((None, "1"), ("0", "0")):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_DEFAULT_FP_FUSION"}
        if given is not None:
            env["TRITON_DEFAULT_FP_FUSION"] = given
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.strip() == expected, out.stderr[-1000:]
