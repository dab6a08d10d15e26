"""The import rules of pyproject.toml's [tool.importlinter] contracts, checked with ast.

Why both: `make lint` runs import-linter (which also follows indirect chains), but a contributor who
only runs `make test` must hit the same direct-import rules. Imports inside functions and under
TYPE_CHECKING count: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_BASELINE_PACKAGES = frozenset({"_scfm"})  # shared backbone zoo, not a method (see pyproject)


def module_name(path: Path) -> str:
    """Dotted module of a file under ROOT (a package's __init__ is the package itself)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in `source`, relative ones resolved against
    `module`; `from a import b` yields `a.b` too, since b may be a submodule."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                head = ".".join([*base, node.module] if node.module else base)
            else:
                head = node.module or ""
            found.append((node.lineno, head))
            found += [(node.lineno, f"{head}.{a.name}") for a in node.names if a.name != "*"]
    return found


def all_imports(top: str) -> list[tuple[str, int, str]]:
    """(file, line, imported module) for every .py file under ROOT/top; `from a import b` gives both
    a and a.b, so a rule reports its first match per line only (see `violations`)."""
    out = []
    for f in sorted((ROOT / top).rglob("*.py")):
        mod = module_name(f)
        for line, name in imported_modules(f.read_text(encoding="utf-8"), mod, f.name == "__init__.py"):
            out.append((str(f.relative_to(ROOT)), line, name))
    return out


def violations(found: list[tuple[str, int, str]]) -> list[str]:
    """One message per offending import statement."""
    first: dict[tuple[str, int], str] = {}
    for f, n, m in found:
        first.setdefault((f, n), f"{f}:{n} imports {m}")
    return list(first.values())


def under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def method_packages() -> list[str]:
    return sorted(
        d.name
        for d in (ROOT / "baselines").iterdir()
        if (d / "__init__.py").is_file() and d.name not in SHARED_BASELINE_PACKAGES
    )


def test_core_never_imports_baselines() -> None:
    bad = violations([i for i in all_imports("stbench") if under(i[2], "baselines")])
    assert not bad, "core (stbench) must not import baselines:\n" + "\n".join(bad)


def test_data_never_imports_benchmark() -> None:
    bad = violations([i for i in all_imports("stbench/data") if under(i[2], "stbench.benchmark")])
    assert not bad, "stbench.data must not import stbench.benchmark:\n" + "\n".join(bad)


def test_no_baseline_imports_another_baseline() -> None:
    found = []
    for f, n, m in all_imports("baselines"):
        parts = Path(f).parts  # ("baselines", <package>, ...)
        if len(parts) < 3 or not under(m, "baselines"):
            continue
        own = parts[1]
        target = m.split(".")[1] if m.count(".") else None
        if target is None or target == own:
            continue
        if target in SHARED_BASELINE_PACKAGES and own not in SHARED_BASELINE_PACKAGES:
            continue  # methods may use the shared backbone zoo
        found.append((f, n, m))
    bad = violations(found)
    assert not bad, (
        "a baseline imports another (move the shared code to stbench/methods/toolkit):\n" + "\n".join(bad)
    )


def test_linter_contracts_name_every_baseline() -> None:
    """A new baseline folder must join the independence contract, or import-linter never checks it."""
    tomllib = pytest.importorskip("tomllib")  # stdlib from Python 3.11
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]
    independence = [c for c in config["contracts"] if c["type"] == "independence"]
    assert len(independence) == 1
    listed = sorted(m.removeprefix("baselines.") for m in independence[0]["modules"])
    assert listed == method_packages()
    forbidden = {
        tuple(c["source_modules"]): c["forbidden_modules"]
        for c in config["contracts"]
        if c["type"] == "forbidden"
    }
    assert sorted(m.removeprefix("baselines.") for m in forbidden[("baselines._scfm",)]) == method_packages()
    assert forbidden[("stbench",)] == ["baselines"]
    assert forbidden[("stbench.data",)] == ["stbench.benchmark"]


@pytest.mark.parametrize(
    ("source", "module", "is_package", "expected"),
    [
        (
            "def f():\n    import baselines.stmdit.vae\n",
            "stbench.data.latents",
            False,
            "baselines.stmdit.vae",
        ),
        ("from .mp import MPConv\n", "baselines.diffbulk.edm2.unet", False, "baselines.diffbulk.edm2.mp"),
        ("from .ema import EMA\n", "baselines.diffbulk.edm2", True, "baselines.diffbulk.edm2.ema"),
        ("from ..stem import ema\n", "baselines.stmdit.method", False, "baselines.stem.ema"),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from stbench.benchmark import results\n",
            "stbench.data.x",
            False,
            "stbench.benchmark.results",
        ),
    ],
)
def test_import_extraction_sees_lazy_relative_and_type_checking_imports(
    source: str, module: str, is_package: bool, expected: str
) -> None:
    assert expected in [name for _, name in imported_modules(source, module, is_package)]
