"""The package layout keeps `accelerate launch finetune/train.py` safe without rewriting sys.path."""

import importlib.machinery
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "finetune"


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
