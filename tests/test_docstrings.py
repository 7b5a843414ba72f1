"""Every ```python example in athooks' docstrings runs (they are rendered into the API reference).

pytest-markdown-docs does not see them: in Google-style docstrings the fences are indented under
"Example:", which Markdown reads as an indented code block, not a fence.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import textwrap
from collections.abc import Iterator

import pytest

import athooks

FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?:python|py)\b[^\n]*\n(?P<body>.*?)^(?P=indent)```", re.S | re.M
)


def _objects(module: object) -> Iterator[tuple[str, object]]:
    yield module.__name__, module
    for name, obj in vars(module).items():
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            yield f"{module.__name__}.{name}", obj
            for attr, member in vars(obj).items():
                target = member.fget if isinstance(member, property) else member
                target = inspect.unwrap(getattr(target, "__func__", target))
                if callable(target) or isinstance(member, property):
                    yield f"{module.__name__}.{name}.{attr}", target
        elif inspect.isfunction(inspect.unwrap(obj)):  # functools wrappers included
            yield f"{module.__name__}.{name}", obj


def _examples() -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    seen: set[int] = set()
    names = ["athooks"] + [
        m.name for m in pkgutil.walk_packages(athooks.__path__, prefix="athooks.")
    ]
    for modname in sorted(names):
        module = importlib.import_module(modname)
        for qualname, obj in _objects(module):
            doc = inspect.getdoc(obj) if not inspect.ismodule(obj) else obj.__doc__
            if not doc or id(obj) in seen:
                continue
            seen.add(id(obj))
            for k, match in enumerate(FENCE.finditer(doc)):
                found.append((f"{qualname}[{k}]", textwrap.dedent(match.group("body"))))
    return found


EXAMPLES = _examples()


def test_examples_were_found():
    assert len(EXAMPLES) > 40


@pytest.mark.parametrize(("where", "code"), EXAMPLES, ids=[w for w, _ in EXAMPLES])
def test_docstring_example_runs(where, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    exec(compile(code, f"<docstring of {where}>", "exec"), {"__name__": "__docstring__"})
