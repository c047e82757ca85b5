"""The package layout keeps `accelerate launch finetune/train.py` safe without rewriting sys.path."""

import importlib.machinery
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "finetune"
# Modules grouped by role; their modules are rows of the layout as package/module.py.
SUBPACKAGES = ("data", "model", "objectives", "retrieval", "training", "publishing")


def test_no_module_of_finetune_shadows_a_top_level_module():
    """Run as a script, train.py puts finetune/ first on sys.path: a module there named like a standard-library
    or installed module (evaluate, logging, types...) would shadow it in every import of the run."""
    names = [path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__"]
    names += [path.name for path in PACKAGE.iterdir() if (path / "__init__.py").is_file()]
    elsewhere = [entry for entry in sys.path if Path(entry or ".").resolve() != PACKAGE]
    clashes = [name for name in names if name in sys.stdlib_module_names
               or importlib.machinery.PathFinder.find_spec(name, elsewhere) is not None]
    assert not clashes, f"finetune/ modules named like top-level modules: {clashes}"
    assert not (PACKAGE / "evaluate" / "__init__.py").exists()  # a namespace folder never shadows `evaluate`


def test_train_script_imports_the_real_evaluate_package():
    """With finetune/ first on sys.path (as a script run sets it), `import evaluate` still finds the package."""
    code = f"import sys; sys.path.insert(0, {str(PACKAGE)!r}); import evaluate; print(evaluate.__file__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "site-packages" in result.stdout and str(PACKAGE) not in result.stdout


def layout_rows() -> list[list[str]]:
    """The finetune/ rows of the README's project layout, in order: the module names each row lists."""
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("```\nfinetune/            training package"):]
    block = block[:block.index("\nfinetune/metrics/")]
    import re

    return [re.findall(r"([a-z_/]+)\.py", line.split("  ", 2)[1]) for line in block.splitlines()[1:]
            if line.startswith("  ") and not line.startswith("   ")]


def finetune_imports(path: Path) -> set[str]:
    """The finetune modules ``path`` imports, at the top or inside functions; a subpackage's as ``package/module``."""
    import ast

    def name(dotted: str) -> str:  # finetune.retrieval.search -> retrieval/search; finetune.data -> data
        parts = dotted.split(".")[1:]
        return "/".join(parts[:2]) if (PACKAGE / parts[0]).is_dir() and len(parts) > 1 else parts[0]

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "finetune":
            found.update([name(node.module)] if "." in node.module else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            found.update(name(alias.name) for alias in node.names if alias.name.startswith("finetune."))
    return found


def test_the_readme_layout_lists_every_module_and_imports_flow_up_its_rows():
    """What the README's layout says is true: every finetune/ module (subpackages' included) has a row, and each
    imports only modules of rows above its own (the metrics folder aside: a leaf)."""
    rows = layout_rows()
    row_of = {name: index for index, names in enumerate(rows) for name in names}
    modules = {path.relative_to(PACKAGE).with_suffix("").as_posix(): path for path in PACKAGE.glob("*.py")
               if path.stem != "__init__"}
    modules.update({path.relative_to(PACKAGE).with_suffix("").as_posix(): path for package in SUBPACKAGES
                    for path in (PACKAGE / package).glob("*.py") if path.stem != "__init__"})
    assert set(modules) == set(row_of), f"missing: {sorted(set(modules) - set(row_of))}, " \
                                        f"not modules: {sorted(set(row_of) - set(modules))}"
    upward = [(name, dependency) for name, path in modules.items() for dependency in finetune_imports(path)
              if dependency in row_of and row_of[dependency] >= row_of[name]]
    assert not upward, f"imports from the same row or below: {upward}"


def test_the_light_data_tools_load_neither_torch_nor_datasets_nor_transformers():
    """validate, convert and split read and write JSON: they depend on finetune's light modules only (schema, text,
    checkpointing), so they start in a fraction of a second and install-light machines can run them."""
    code = ("import sys, data_prep.validate, data_prep.convert, data_prep.split; "
            "print(sorted(m for m in ('torch', 'datasets', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", result.stdout
