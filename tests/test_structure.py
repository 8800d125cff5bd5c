"""The package's shape, checked: no import cycles, modules of a readable size, and each fact in one place.

These read the source (ast), so they hold for every later change: a new cycle, a second merge, a
hand-written atomic write or a second way to read an adapter folder fails here with its location.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "src" / "llm_finetune"
MAX_LINES, JUSTIFY_LINES = 600, 450


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    return skip


def _imported_modules(name: str, path: Path) -> list[tuple[str, int]]:
    """Package modules `name` imports anywhere (inside functions too), with line numbers."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_nodes(tree)
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.split(".")[0] == "llm_finetune"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "llm_finetune":
                module = node.module
            else:
                continue
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module for a in node.names]
        else:
            continue
        found += [(t, node.lineno) for t in targets if t in MODULES and t != name]
    return found


def _cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return result


def test_no_import_cycles_even_inside_functions():
    edges = {name: _imported_modules(name, path) for name, path in MODULES.items()}
    cycles = _cycles({name: [t for t, _ in targets] for name, targets in edges.items()})
    where = [f"{m}:{line} -> {t}" for c in cycles for m in c for t, line in edges[m] if t in c]
    assert not cycles, f"import cycles: {cycles}\n" + "\n".join(where)


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]


def test_modules_stay_readable():
    for name, path in MODULES.items():
        lines = path.read_text(encoding="utf-8").count("\n")
        assert lines <= MAX_LINES, f"{path.relative_to(ROOT)}: {lines} lines (at most {MAX_LINES}); split it"
        if lines > JUSTIFY_LINES:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
            assert "stays whole" in doc, (f"{path.relative_to(ROOT)}: {lines} lines; over {JUSTIFY_LINES} its "
                                          "docstring says why it stays whole")


def _calls(attribute: str) -> list[str]:
    """Where `x.attribute(...)` or `attribute(...)` is called in the package."""
    found = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
                if called == attribute:
                    found.append(f"{name}:{node.lineno}")
    return found


def _function_of(module: str, line: int) -> str | None:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.lineno <= line <= node.end_lineno:
            return node.name
    return None


def test_one_merge():
    calls = _calls("merge_and_unload")
    assert [(c.split(":")[0], _function_of(c.split(":")[0], int(c.split(":")[1]))) for c in calls] == \
        [("llm_finetune.methods", "merge_adapter")], calls


def test_one_place_builds_the_training_encoder_from_config():
    """A ChatEncoder given any option beyond the tokenizer is built only by data.tokenize.encoder_for."""
    builders = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ChatEncoder":
                if len(node.args) > 1 or any(k.arg in ("max_length", "truncation", "train_on") for k in node.keywords):
                    builders.append((name, _function_of(name, node.lineno)))
    assert builders == [("llm_finetune.data.tokenize", "encoder_for")], builders


def test_one_atomic_write_helper():
    """Temporary files renamed into place are written in manifest.py only (atomic_file, atomic_dir)."""
    low_level = [c for attr in ("replace", "rename", "mkstemp", "mkdtemp") for c in _calls(attr)
                 if not c.startswith("llm_finetune.manifest:")]
    # str.replace is a call named `replace` too: keep those whose receiver is `os`, `tempfile` or a Path.
    suspicious = []
    for c in low_level:
        module, line = c.split(":")
        text = MODULES[module].read_text(encoding="utf-8").split("\n")[int(line) - 1]
        if any(s in text for s in ("os.replace", "os.rename", "mkstemp", "mkdtemp", ".rename(")):
            suspicious.append(f"{c}: {text.strip()}")
    assert not suspicious, "\n".join(suspicious)


def test_one_adapter_folder_reader():
    """Only artifacts.py names the files that make an adapter folder; every verb opens it through there."""
    names = {"adapter_config.json", "run_manifest.json", "tokenizer_config.json"}
    readers = []
    for name, path in MODULES.items():
        if name == "llm_finetune.artifacts":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                      and isinstance(n.body[0], ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in names and id(node) not in docstrings:
                readers.append(f"{name}:{node.lineno} {node.value!r}")
    assert readers == []


def test_every_user_error_has_one_base():
    """The CLI catches errors.UserError; every error class the package defines derives from it."""
    from llm_finetune import errors

    defined = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and any("Error" in ast.unparse(b) for b in node.bases):
                defined.append((name, node.name))
    assert {m for m, _ in defined} == {"llm_finetune.errors"}, defined
    for _, cls in defined:
        assert issubclass(getattr(errors, cls), errors.UserError)


def test_the_recipe_imports_nothing_inside_its_functions():
    tree = ast.parse(MODULES["llm_finetune.train"].read_text(encoding="utf-8"))
    inside = [f"train.py:{n.lineno}" for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
              for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not inside, inside
    run = next(f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "run")
    called = [n.func.id for n in ast.walk(run) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    assert called == ["setup", "fit", "finish"]


@pytest.mark.parametrize("folder", ["data", "evaluation", "export"])
def test_tests_mirror_the_package(folder):
    assert (ROOT / "tests" / folder).is_dir() and any((ROOT / "tests" / folder).glob("test_*.py"))
    assert (PACKAGE / folder / "__init__.py").is_file()
