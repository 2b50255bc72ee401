"""Benchmark run caches: the training-code version leaves out exactly the analysis modules no training
module imports (a change to one of those re-analyses cached runs; to anything else, retrains)."""

from __future__ import annotations

import ast
from pathlib import Path

from benchmarks import cache

ROOT = Path(__file__).resolve().parents[2]


def _imported_modules(path: Path, module: str) -> set[str]:
    """Every module that ``path`` (the module named ``module``) imports, at any depth of its code (lazy
    imports inside functions too), relative imports resolved."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            parent = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found.add(parent)
            found |= {f"{parent}.{a.name}" for a in node.names}
    return found


def _training_modules() -> list[tuple[str, Path]]:
    """Every Python module of the training code's version (``cache.MOE_TINY_CODE``'s directories)."""
    out = []
    for top in cache.MOE_TINY_CODE:
        if (ROOT / top).is_dir():
            for path in sorted((ROOT / top).rglob("*.py")):
                parts = path.relative_to(ROOT).with_suffix("").parts
                out.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    return out


ANALYSIS = {p.removesuffix(".py").replace("/", ".") for p in cache.ANALYSIS_ONLY}


def test_no_training_module_imports_an_analysis_only_module():
    assert {"launcher.laws.loss_curve", "launcher.laws.e_of_s"} == ANALYSIS
    modules = _training_modules()
    assert {"launcher.pretrain", "patches"} <= {name for name, _ in modules}
    for name, path in modules:
        if name in ANALYSIS:
            continue
        imported = _imported_modules(path, name) & ANALYSIS
        assert not imported, f"{name} imports {imported}: take it out of benchmarks/cache.ANALYSIS_ONLY"


def test_importing_every_training_module_loads_no_analysis_module():
    """What the scan cannot see (an import by string) at import time: import them all in a fresh process."""
    import subprocess
    import sys

    names = [n for n, _ in _training_modules() if n not in ANALYSIS]
    code = (
        "import importlib, sys\n"
        f"for n in {names!r}:\n"
        "    importlib.import_module(n)\n"
        f"print(sorted(set(sys.modules) & set({sorted(ANALYSIS)!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_scan_sees_lazy_and_relative_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        "def f():\n"
        "    from launcher.laws import loss_curve\n"
        "    import launcher.laws.e_of_s\n"
        "    from . import e_of_s\n"
        "    from .loss_curve import fit_loss_law\n"
        "    from ..laws.e_of_s import analyse\n"
    )
    found = _imported_modules(src, "launcher.laws.m")
    assert {
        "launcher.laws.loss_curve",
        "launcher.laws.e_of_s",
        "launcher.laws.loss_curve.fit_loss_law",
    } <= found
    assert "launcher.laws.e_of_s.analyse" in found
    assert _imported_modules(src, "launcher.laws.m") >= ANALYSIS


def test_an_analysis_module_is_out_of_the_training_version_and_any_other_file_is_in(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "ROOT", tmp_path)
    (tmp_path / "launcher" / "laws").mkdir(parents=True)
    train, analysis = tmp_path / "launcher" / "train.py", tmp_path / "launcher" / "laws" / "loss_curve.py"
    train.write_text("x = 1\n")
    analysis.write_text("y = 1\n")
    v0 = cache.code_version(["launcher"])
    analysis.write_text("y = 2\n")
    assert cache.code_version(["launcher"]) == v0
    train.write_text("x = 2\n")
    assert cache.code_version(["launcher"]) != v0
