"""athooks-zoo uses only athooks' public plugin API: ``athooks`` itself and ``athooks.plugin``.

Every module of the package is parsed (not imported) and each import of athooks checked: ``import
athooks``, ``import athooks.plugin``, ``from athooks import <a top-level name>`` and ``from
athooks.plugin import ...`` pass; a submodule of athooks (``athooks.losses.base``,
``from athooks import checks``), also through ``importlib.import_module`` or ``__import__`` with a
literal name, fails, naming the file and line.
"""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import pytest

import athooks

SRC = Path(__file__).resolve().parents[1] / "src" / "athooks_zoo"
#: Submodules athooks exports in its ``__all__`` (``athooks.viz``) are public too.
PUBLIC = {"plugin"} | set(getattr(athooks, "__all__", ()))
ALLOWED = {"athooks"} | {f"athooks.{name}" for name in PUBLIC}
#: athooks' private submodules and subpackages, also private by ``from athooks import x``.
SUBMODULES = {m.name for m in pkgutil.iter_modules(athooks.__path__)} - PUBLIC


def _modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def _private_imports(path: Path) -> list[str]:
    """``line: statement`` of every import of a private part of athooks in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[str] = []

    def check(module: str, line: int, text: str) -> None:
        if (module == "athooks" or module.startswith("athooks.")) and module not in ALLOWED:
            found.append(f"{line}: {text}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                check(alias.name, node.lineno, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            check(node.module, node.lineno, f"from {node.module} import ...")
            if node.module == "athooks":
                for alias in node.names:
                    if alias.name in SUBMODULES:
                        found.append(f"{node.lineno}: from athooks import {alias.name}")
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if (
                name in {"import_module", "__import__"}
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
            ):
                check(first.value, node.lineno, f"{name}({first.value!r})")
    return found


def test_the_package_has_modules():
    names = {p.name for p in _modules()}
    assert {"__init__.py", "plugin.py", "logits.py"} <= names


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_only_the_public_api_is_imported(path):
    bad = _private_imports(path)
    assert not bad, (
        f"{path.relative_to(SRC.parent)} imports private parts of athooks: {bad}. A plugin "
        "package uses only `athooks` (top level: athooks.loss, athooks.CaptureError, ...) and "
        "`athooks.plugin`; ask for what is missing to be added to athooks.plugin"
    )


def test_the_checker_catches_private_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import athooks\n"
        "import athooks.plugin\n"
        "from athooks import CaptureError, loss\n"
        "from athooks.plugin import Loss\n"
        "from athooks.losses.base import logits_of\n"
        "import athooks.checks as c\n"
        "from athooks import mappings\n"
        "import importlib\n"
        "importlib.import_module('athooks.registry')\n"
        "from . import sibling\n",
        encoding="utf-8",
    )
    bad = _private_imports(sample)
    assert [entry.split(":")[0] for entry in bad] == ["5", "6", "7", "9"], bad
