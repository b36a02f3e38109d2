"""The import rules of ARCHITECTURE.md, checked on the source: every `import` statement of every
module (at any depth: a function's lazy import counts too), followed transitively.

- nothing in keraslm/ imports serve/ or export/;
- serve/ reaches only the TensorFlow-free core of keraslm/, transitively, and of the heavy
  packages only onnxruntime (a serving host has neither TensorFlow nor onnx);
- the core imports neither TensorFlow, Keras, onnxruntime nor onnx;
- export/ may use both sides.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("keraslm", "serve", "export")
CORE = {"keraslm", "keraslm.errors", "keraslm.files", "keraslm.text", "keraslm.vocab",
        "keraslm.batching", "keraslm.variable_bptt", "keraslm.contract", "keraslm.scores",
        "keraslm.config"}
HEAVY = ("tensorflow", "keras", "onnxruntime", "onnx", "tf2onnx")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def imports_of(path: Path, name: str) -> set[str]:
    """Every module `path` imports, absolute, with `from a import b` counted as a.b when a.b is
    a module of the project, else as a."""
    known = all_modules()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in known)
    return found


def closure(start: str) -> dict[str, list[str]]:
    """Every project module reachable from `start`, each with the import chain that reaches it;
    third-party modules appear as leaves."""
    known = all_modules()
    chains = {start: [start]}
    todo = [start]
    while todo:
        name = todo.pop()
        for imported in imports_of(known[name], name):
            targets = [imported]
            parts = imported.split(".")  # importing a.b.c runs a/__init__ and a.b/__init__ too
            targets += [".".join(parts[:i]) for i in range(1, len(parts))]
            for target in targets:
                if target not in chains and (target in known or target.split(".")[0] in HEAVY):
                    chains[target] = chains[name] + [target]
                    if target in known:
                        todo.append(target)
    return chains


def test_the_walker_sees_lazy_imports_and_chains():
    """The checker itself: a lazy import inside a function is found, with its chain."""
    chains = closure("keraslm.evaluate")
    assert "tensorflow" in chains  # evaluate imports TensorFlow only inside main()
    assert chains["tensorflow"][0] == "keraslm.evaluate"


@pytest.mark.parametrize("name", sorted(n for n in all_modules() if n.startswith("keraslm")))
def test_keraslm_never_imports_serve_or_export(name):
    bad = [c for m, c in closure(name).items() if m.split(".")[0] in ("serve", "export")]
    assert not bad, f"{name} reaches {' -> '.join(bad[0])}"


@pytest.mark.parametrize("name", sorted(n for n in all_modules() if n.startswith("serve")))
def test_serve_reaches_only_the_core(name):
    bad = [c for m, c in closure(name).items()
           if (m.startswith("keraslm") and m not in CORE)
           or m.split(".")[0] in ("tensorflow", "keras", "onnx", "tf2onnx")]
    assert not bad, f"{name} reaches {' -> '.join(bad[0])}"


@pytest.mark.parametrize("name", sorted(CORE))
def test_the_core_imports_no_framework(name):
    bad = [c for m, c in closure(name).items()
           if m.split(".")[0] in HEAVY or (m.startswith("keraslm") and m not in CORE)]
    assert not bad, f"{name} reaches {' -> '.join(bad[0])}"
