"""The structure the code promises: a family is one folder, kernels stand alone, no test hooks in
production code."""
import ast
from pathlib import Path

import pytest

from recur.modeling import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
FAMILY_FOLDERS = {Path(f.config.__module__.split(".")[2]) for f in FAMILIES.values()}  # gla, griffin, ...


def production_modules():
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT)
        if relative.parts[0] in ("tests", ".venv", "build", "runs") or relative.parts[0].startswith("."):
            continue
        yield relative, ast.parse(path.read_text())


def code_strings(tree):
    """String constants that are not docstrings."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def imported_modules(tree, relative: Path):
    package = ["recur", *relative.parts[:-1]]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            yield ".".join(base + ([node.module] if node.module else []))
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def test_no_module_outside_a_family_folder_names_a_family():
    """Adding a family touches only its folder: registration, convert, the trainer, FLOPs and the
    tests iterate over the declarations (recipes and docs aside)."""
    model_types = set(FAMILIES)
    offenders = []
    for relative, tree in production_modules():
        if relative.parts[0] == "modeling" and len(relative.parts) > 2 and Path(relative.parts[1]) in FAMILY_FOLDERS:
            continue  # inside a family's own folder
        for text in code_strings(tree):
            offenders += [f"{relative}: {text!r}" for t in model_types if t in text]
        for module in imported_modules(tree, relative):
            parts = module.split(".")
            if parts[:2] == ["recur", "modeling"] and len(parts) > 2 and Path(parts[2]) in FAMILY_FOLDERS:
                offenders.append(f"{relative}: imports {module}")
    assert not offenders, offenders


def test_kernels_import_nothing_of_transformers_or_the_models():
    for relative, tree in production_modules():
        if relative.parts[0] == "kernels":
            for module in imported_modules(tree, relative):
                assert not module.startswith(("transformers", "recur.modeling", "recur.train")), (relative, module)


@pytest.mark.parametrize("word", ["RECUR_TEST", "monkeypatch"])
def test_no_test_hooks_in_production_code(word):
    hits = [str(relative) for relative, tree in production_modules() if any(word in s for s in code_strings(tree))]
    assert not hits, hits


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(block) == 2 and "recur quickstart" in block[0] and "pytest" in block[1]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == [block[1]]
