"""Saved recur checkpoints carry their own code, so transformers loads them without recur.

`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` imports the modules named
in config.json's `auto_map` from the folder, following only single-dot relative imports of files
beside them. So the family's modules and everything they import from recur (kernels, shared
layers, cache) are written there as flat files, each `from ..x.y import n` rewritten to
`from .recur_x_y import n`. The family's own configuration/modeling files keep their names.
"""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path


def _flat_name(module: str, family_package: str) -> str:
    if module.rpartition(".")[0] == family_package:
        return module.rpartition(".")[2]  # configuration_gla, modeling_gla
    return "recur_" + module.removeprefix("recur.").replace(".", "_")


def _rewritten(module: str, family_package: str) -> tuple[str, list[str]]:
    """The module's source with its relative imports made flat, and the recur modules it imports."""
    path = Path(importlib.util.find_spec(module).origin)  # found, not imported (fla_ops would load fla)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    source = path.read_text()
    lines = source.splitlines(keepends=True)
    edits, needed = [], []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and node.__dict__.get("level", 0) == 0:
            names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if any(n and n.split(".")[0] == "recur" for n in names):
                raise ValueError(f"{module} imports recur absolutely: its code cannot travel with the checkpoint")
        if isinstance(node, ast.ImportFrom) and node.level:
            if node.module is None:
                raise ValueError(f"{module}: 'from . import x' cannot be bundled; import the names instead")
            target = importlib.util.resolve_name("." * node.level + node.module, package)
            imported = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
            edits.append((node.lineno, node.end_lineno, node.col_offset,
                          f"from .{_flat_name(target, family_package)} import {imported}\n"))
            needed.append(target)
    for first, last, indent, text in sorted(edits, reverse=True):
        lines[first - 1:last] = [" " * indent + text]
    return "".join(lines), needed


def write_code(model, folder: str | Path) -> dict:
    """Writes the code of `model`'s class into `folder`; returns the `auto_map` for its config."""
    model_class = type(model)
    family_package = model_class.__module__.rpartition(".")[0]
    todo, written = [model_class.__module__, model_class.config_class.__module__], set()
    while todo:
        module = todo.pop()
        if module in written:
            continue
        source, needed = _rewritten(module, family_package)
        (Path(folder) / f"{_flat_name(module, family_package)}.py").write_text(source)
        written.add(module)
        todo += needed
    where = lambda cls: f"{_flat_name(cls.__module__, family_package)}.{cls.__name__}"
    auto_map = {"AutoConfig": where(model_class.config_class)}
    if hasattr(model, "generate") and hasattr(model, "model"):  # a ForCausalLM around the base model
        auto_map["AutoModel"] = where(type(model.model))
        auto_map["AutoModelForCausalLM"] = where(model_class)
    else:
        auto_map["AutoModel"] = where(model_class)
    return auto_map
