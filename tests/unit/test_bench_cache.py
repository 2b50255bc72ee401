"""Benchmark run caches: the training-code version leaves out exactly the analysis modules no training
module imports (a change to one of those re-analyses cached runs; to anything else, retrains)."""

from __future__ import annotations

import ast
from pathlib import Path

from benchmarks import cache

ROOT = Path(__file__).resolve().parents[2]


def _imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code (lazy imports inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_no_training_module_imports_an_analysis_only_module():
    analysis = {p.removesuffix(".py").replace("/", ".") for p in cache.ANALYSIS_ONLY}
    assert analysis == {"launcher.laws.loss_curve", "launcher.laws.e_of_s"}
    for path in sorted((ROOT / "launcher").rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        if name in analysis:
            continue
        imported = _imported_modules(path) & analysis
        assert not imported, f"{name} imports {imported}: take it out of benchmarks/cache.ANALYSIS_ONLY"


def test_the_scan_sees_a_lazy_import(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from launcher.laws import loss_curve\n    import launcher.laws.e_of_s\n")
    assert {"launcher.laws.loss_curve", "launcher.laws.e_of_s"} <= _imported_modules(src)


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
