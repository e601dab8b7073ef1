"""The installed package: everything under one `vidport` namespace, every subpackage and data file
listed in pyproject.toml and shipped in the wheel, specs found from the installed copy, and an
import graph between the top-level packages that keeps its one direction (no cycles)."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml needs tomllib (3.11+) or tomli")

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("converter", "mappings", "reference", "runtime", "golden")  # installed as vidport.<folder>
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def package_dir(package: str) -> Path:
    """The folder `package` (a `vidport.*` name) installs from."""
    assert SETUPTOOLS["package-dir"] == {"vidport": "."}, "the tests assume vidport maps to the repository root"
    return ROOT.joinpath(*package.split(".")[1:])


def shipped_files() -> list[Path]:
    """Every file under the package folders that a wheel must carry (sources and data)."""
    return sorted(path for folder in FOLDERS for path in (ROOT / folder).rglob("*")
                  if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc")


def test_packages_list_every_folder_with_an_init():
    found = {"vidport"} | {"vidport." + ".".join(init.parent.relative_to(ROOT).parts)
                           for folder in FOLDERS for init in (ROOT / folder).rglob("__init__.py")}
    listed = set(SETUPTOOLS["packages"])
    assert not found - listed, f"pyproject.toml [tool.setuptools] packages lacks {sorted(found - listed)}"
    assert not listed - found, f"pyproject.toml lists packages with no __init__.py: {sorted(listed - found)}"


def test_package_data_globs_cover_every_data_file():
    covered = {path for package, globs in SETUPTOOLS["package-data"].items()
               for pattern in globs for path in package_dir(package).glob(pattern)}
    data = [path for path in shipped_files() if path.suffix != ".py"]
    assert {"runtime/blas/shim.c", "converter/ttnn_support/mock_cluster_n150.yaml",
            "mappings/targets/mlx.yaml"} <= {str(p.relative_to(ROOT)) for p in data}
    missing = [str(path.relative_to(ROOT)) for path in data if path not in covered]
    assert not missing, f"no [tool.setuptools.package-data] glob ships {missing}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built offline from a copy of what pyproject.toml packages (the working tree stays
    clean: setuptools writes build/ and *.egg-info beside the sources)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "cli.py"):
        shutil.copy2(ROOT / name, source / name)
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(out), str(source)], capture_output=True, text=True)
    assert built.returncode == 0, f"pip wheel failed (setuptools must be in the environment):\n{built.stderr[-3000:]}"
    (found,) = out.glob("vidport-*.whl")
    return found


def test_wheel_holds_only_the_vidport_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"vidport", wheel.name.split("-py")[0] + ".dist-info"}, f"top level of the wheel: {sorted(top)}"
    expected = {"vidport/cli.py"} | {"vidport/" + str(path.relative_to(ROOT)) for path in shipped_files()}
    assert not expected - set(names), f"missing from the wheel: {sorted(expected - set(names))}"
    entry_points = zipfile.ZipFile(wheel).read(wheel.name.split("-py")[0] + ".dist-info/entry_points.txt").decode()
    assert "[console_scripts]\nvidport = vidport.cli:app" in entry_points


def test_installed_wheel_finds_its_specs(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    # -I -S: no repository on sys.path and no .pth files (so no editable install); the environment's
    # site-packages is appended by hand, for pyyaml and numpy
    site_packages = next(p for p in sys.path if p.endswith("site-packages"))
    code = ("import sys; sys.path[:0] = [sys.argv[1]]; sys.path.append(sys.argv[2]); "
            "import vidport.cli, vidport.converter.spec as spec, vidport.converter.pipeline_spec as pipes; "
            "print(vidport.cli.__file__); print(spec.MAPPINGS_DIR); "
            "print(' '.join(sorted(spec.load_catalog().families))); print(' '.join(sorted(pipes.load_pipeline_specs())))")
    done = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(target), site_packages], cwd=tmp_path,
                          capture_output=True, text=True, env={"VIDPORT_MAPPINGS": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    cli_file, mappings, families, pipelines = done.stdout.splitlines()
    assert Path(cli_file).is_relative_to(target) and Path(mappings).is_relative_to(target)
    assert families.split() == sorted(p.parent.name for p in (ROOT / "mappings").glob("*/family.yaml"))
    assert pipelines.split() == sorted(p.stem for p in (ROOT / "mappings" / "pipelines").glob("*.yaml"))


# -- the import graph -------------------------------------------------------------------------------

# what each top-level package may import besides itself: cli -> golden -> reference, runtime ->
# converter -> converter.core (errors, manifest, named objects, tensorbin), which imports no vidport code
ALLOWED = {
    "cli": {"golden", "reference", "runtime", "converter", "converter.core"},
    "golden": {"reference", "runtime", "converter", "converter.core"},
    "reference": {"converter", "converter.core"},
    "runtime": {"converter", "converter.core"},
    "converter": {"converter.core"},
    "converter.core": set(),
    "mappings": set(),
}
BARE = {"cli", *FOLDERS}  # what must always be imported as vidport.<name>
HEAVY = {"torch", "mlx", "diffusers", "transformers", "ttnn"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(("vidport",) + (parts[:-1] if parts[-1] == "__init__" else parts))


def layer(module: str) -> str:
    """The top-level package of a vidport module: cli, golden, ..., with converter.core on its own."""
    parts = module.split(".")[1:]
    if parts[:2] == ["converter", "core"]:
        return "converter.core"
    return parts[0] if parts else "vidport"


def product_files() -> list[Path]:
    return [ROOT / "cli.py"] + [path for path in shipped_files() if path.suffix == ".py"]


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every import in the file, at module level or inside functions;
    `from A import b` counts as A.b when that is a vidport module, else as A."""
    modules = {module_name(p) for p in product_files()}
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.append((node.lineno, f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base))
    return found


def import_edges() -> list[tuple[str, str, str]]:
    """(from package, to package, "file:line imports module") for every import of vidport code."""
    edges = []
    for path in product_files():
        for line, module in imports_of(path):
            if module == "vidport" or module.startswith("vidport."):
                edges.append((layer(module_name(path)), layer(module), f"{path.relative_to(ROOT)}:{line} imports {module}"))
    return edges


def test_product_code_imports_vidport_names_only():
    bare = [f"{path.relative_to(ROOT)}:{line} imports {module}" for path in product_files()
            for line, module in imports_of(path) if module.split(".")[0] in BARE | {"fixtures"}]
    assert not bare, ("import these as vidport.<package> (test fixtures live in tests/ and are not installed):\n  "
                      + "\n  ".join(bare))


def test_packages_import_only_downwards():
    wrong = [f"{where} ({source} may import {', '.join(sorted(ALLOWED[source])) or 'nothing of vidport'})"
             for source, target, where in import_edges() if target != source and target not in ALLOWED[source]]
    assert not wrong, ("the layering is cli -> golden -> reference, runtime -> converter -> converter.core; broken by:\n  "
                       + "\n  ".join(wrong))


def test_package_graph_has_no_cycle():
    graph: dict[str, dict[str, str]] = {}
    for source, target, where in import_edges():
        if source != target:
            graph.setdefault(source, {}).setdefault(target, where)

    def cycle_from(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        for nxt in graph.get(node, {}):
            found = cycle_from(nxt, path + [node])
            if found:
                return found
        return None

    for start in graph:
        cycle = cycle_from(start, [])
        if cycle:
            steps = "\n  ".join(graph[a][b] for a, b in zip(cycle, cycle[1:]))
            pytest.fail(f"import cycle {' -> '.join(cycle)}:\n  {steps}")


def test_core_imports_no_heavy_library():
    heavy = [f"{path.relative_to(ROOT)}:{line} imports {module}" for path in (ROOT / "converter" / "core").rglob("*.py")
             for line, module in imports_of(path) if module.split(".")[0] in HEAVY]
    assert not heavy, "converter/core is imported by everything; it must not pull in:\n  " + "\n  ".join(heavy)
