"""The tree's structure, read from the source: what the architecture promises, held by a test.

- no module imports another module's ``_private`` name, and no code reads another object's private
  members (``obj._x`` for any ``obj`` but ``self`` and ``cls``); no test module imports another;
- outside the store package, nobody asks a store what it is (``isinstance``/``hasattr``/``getattr`` on a
  store object or class): everything a caller uses is on the store's contract;
- no import circle between cattn's modules, with lazy (in-function) and ``TYPE_CHECKING`` imports counted;
- no source file over 400 lines.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "cattn"
SOURCE_FOLDERS = ("cattn", "bench", "tests", "examples")
MAX_LINES = 400

# Underscored names that are other libraries' API, with no public equivalent: namedtuple's methods,
# argparse's action classes and parser actions, transformers' attention setting and generation hook,
# a tensor's version counter (the fingerprint's cache of a weight is valid while it is unchanged).
PUBLIC_UNDERSCORED = {"_replace", "_asdict", "_fields", "_make", "_HelpAction", "_VersionAction", "_actions",
                      "_attn_implementation", "_prepare_cache_for_generation", "_version"}


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in python_files("cattn")}


def resolve(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The absolute module named by ``from <module> import ...`` in module ``importer``."""
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(path: Path) -> set[str]:
    """Every cattn module ``path`` imports, anywhere in its body (``from a import b`` counts ``a.b`` when
    ``b`` is a module)."""
    importer, found = module_name(path), set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "cattn")
        elif isinstance(node, ast.ImportFrom):
            module = resolve(node, importer, path.name == "__init__.py")
            if module.split(".")[0] != "cattn":
                continue
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                found.add(sub if sub in MODULES else module)
    return {m for m in found if m in MODULES and m != importer}


def test_no_module_imports_another_modules_private_name():
    offences = []
    for path in python_files(*SOURCE_FOLDERS):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("cattn", "bench", "tests"):
                offences += [f"{path.relative_to(REPO)}:{node.lineno}: {a.name} from {node.module}"
                             for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert offences == []


def test_no_test_module_imports_another_test_module_or_a_conftest():
    """Shared helpers live in modules named for what they hold, shared fixtures in conftest.py files."""
    offences = []
    for path in python_files("tests", "bench"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tests"):
                last = node.module.rsplit(".", 1)[-1]
                if last.startswith("test_") or last == "conftest":
                    offences.append(f"{path.relative_to(REPO)}:{node.lineno}: from {node.module}")
    assert offences == []


def test_no_code_reads_another_objects_private_members():
    offences = []
    for path in python_files(*SOURCE_FOLDERS):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and node.attr not in PUBLIC_UNDERSCORED):
                continue
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
                continue
            offences.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert offences == []


def store_names(tree: ast.AST) -> set[str]:
    """Names bound by imports from the store package."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cattn.store"):
            names.update(a.asname or a.name for a in node.names)
    return names


def test_nobody_outside_the_store_asks_a_store_what_it_is():
    offences = []
    for path in python_files("cattn", "bench"):
        if path.is_relative_to(PACKAGE / "store"):
            continue
        tree = ast.parse(path.read_text(), str(path))
        names = store_names(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args
                    and node.func.id in ("isinstance", "hasattr", "getattr")):
                continue
            subject = ast.unparse(node.args[0])
            classes = node.args[1] if node.func.id == "isinstance" and len(node.args) > 1 else None
            class_names = {n.id for n in ast.walk(classes) if isinstance(n, ast.Name)} if classes else set()
            if "store" in subject.lower() or class_names & names:
                offences.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert offences == []


def test_no_import_circle():
    graph = {m: imported_modules(p) for m, p in MODULES.items()}
    circles, state = [], {}

    def visit(module: str, trail: list[str]):
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                circles.append(" -> ".join(trail[trail.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, trail + [dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []


@pytest.mark.parametrize("folder", SOURCE_FOLDERS)
def test_no_source_file_over_400_lines(folder):
    long = {str(p.relative_to(REPO)): n for p in python_files(folder)
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
