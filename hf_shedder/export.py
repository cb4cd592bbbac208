"""Exports of a pruned model that do not need hf_shedder installed.

* remote code: the modules needed to build a pruned model are written next to the weights as flat
  files (``configuration_hf_shedder.py``, ``modeling_hf_shedder.py`` and their relative imports, with
  package-relative imports rewritten to same-folder imports) and ``config.json`` gets an ``auto_map``,
  so ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads it. Only the model's
  own family is carried: the adapter registry (``hf_shedder.arch``) is written without the imports of
  the other families' adapters (and of the model classes only they use), and the files behind them
  are left out.
* plain: for plans that only remove whole blocks, the pruned model *is* a base-architecture model
  with fewer layers; it is saved as such (keys without the ``model.`` prefix).
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path
from typing import Any

from .arch import get_adapter
from .errors import PlanError

PACKAGE = "hf_shedder"
_PACKAGE_DIR = Path(__file__).resolve().parent
_ENTRY_MODULES = ("hf_shedder.config", "hf_shedder.modeling")
_SPECIAL_NAMES = {"hf_shedder.config": "configuration_hf_shedder", "hf_shedder.modeling": "modeling_hf_shedder"}


def remote_code_auto_map() -> dict[str, str]:
    return {
        "AutoConfig": "configuration_hf_shedder.ShedderConfig",
        "AutoModelForCausalLM": "modeling_hf_shedder.PrunedMambaForCausalLM",
    }


def _module_file(module: str) -> Path:
    rel = Path(*module.split(".")[1:])
    as_pkg = _PACKAGE_DIR / rel / "__init__.py"
    return as_pkg if as_pkg.is_file() else (_PACKAGE_DIR / rel).with_suffix(".py")


def _flat_name(module: str) -> str:
    return _SPECIAL_NAMES.get(module) or module.replace(".", "_")


def _resolve(module: str, is_pkg: bool, level: int, name: str | None) -> str:
    parts = module.split(".")
    base = parts if is_pkg else parts[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _relative_imports(module: str) -> list[tuple[int, int, str, str, list[str]]]:
    """(first line, last line, source module text, absolute target, imported names) for each relative
    import of ``module``."""
    path = _module_file(module)
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            target = _resolve(module, is_pkg, node.level, node.module)
            names = [a.asname or a.name for a in node.names]
            if not node.module:  # "from . import x": each name is a submodule
                for alias in node.names:
                    out.append((node.lineno, node.end_lineno or node.lineno, "", f"{target}.{alias.name}", names))
            else:
                out.append((node.lineno, node.end_lineno or node.lineno, "." * node.level + node.module, target, names))
    return out


def _other_families(model_type: str | None) -> frozenset[str]:
    """Modules the adapter registry imports only for families other than ``model_type``'s."""
    if model_type is None:
        return frozenset()
    from .arch import ADAPTERS, adapter_class_for, custom_config_class, custom_model_class

    own = {adapter_class_for(model_type).__module__}
    own |= {c.__module__ for c in (custom_config_class(model_type), custom_model_class(model_type)) if c is not None}
    registry = {t for *_, t, _ in _relative_imports(_REGISTRY)}
    family_modules = {cls.__module__ for cls in ADAPTERS} | {
        t for t in registry if t.startswith(f"{PACKAGE}.models.")
    }
    return frozenset(t for t in registry & family_modules if not any(o == t or o.startswith(t + ".") for o in own))


_REGISTRY = f"{PACKAGE}.arch"  # the adapter registry: imports every family's adapter


def remote_code_modules(model_type: str | None = None) -> list[str]:
    """Transitive closure of the package modules needed to load a pruned model (of ``model_type``'s family
    only, when given)."""
    skip = _other_families(model_type)
    todo, seen = list(_ENTRY_MODULES), set()
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        todo.extend(t for *_, t, _ in _relative_imports(mod) if t not in seen and not (mod == _REGISTRY and t in skip))
    return sorted(seen)


def _rewrite(module: str, skip: frozenset[str] = frozenset()) -> str:
    """Source of ``module`` with its relative imports pointing at the flat sibling files; imports of
    ``skip`` (other families, registry only) become ``None`` placeholders that the registry drops."""
    lines = _module_file(module).read_text().splitlines(keepends=True)
    dropped = False
    for first, last, written, target, names in _relative_imports(module):
        if module == _REGISTRY and target in skip:
            lines[first - 1] = " = ".join(names) + " = None  # another family's: not in this export\n"
            for i in range(first, last):
                lines[i] = ""
            dropped = True
        elif written:
            line = lines[first - 1]
            lines[first - 1] = re.sub(r"from\s+" + re.escape(written) + r"\s+import", f"from .{_flat_name(target)} import", line, count=1)
        else:
            raise PlanError(f"remote-code export does not support 'from . import' in {module}")
    if dropped:
        lines.append("\n# This export carries one family's adapter only.\n"
                     "ADAPTERS[:] = [a for a in ADAPTERS if a is not None]\n")
    header = f"# Generated by hf_shedder's remote-code export from {module}; do not edit.\n"
    return header + "".join(lines)


def write_remote_code(directory: str | os.PathLike[str], model_type: str | None = None) -> list[str]:
    """Write the flat loading code into ``directory`` (for the family of the base ``model_type``: its
    adapter only; None: every family's); returns the file names written."""
    skip = _other_families(model_type)
    written = []
    for module in remote_code_modules(model_type):
        name = _flat_name(module) + ".py"
        Path(directory, name).write_text(_rewrite(module, skip))
        written.append(name)
    return written


def save_plain(pruned: Any, directory: str | os.PathLike[str], **kwargs: Any) -> None:
    """Save a block-only pruned model as a stock base-architecture checkpoint."""
    plan = pruned.config.get_plan()
    adapter = get_adapter(pruned.model)
    if not adapter.block_only_export_supported(plan):
        raise PlanError(
            f"a plain {type(pruned.model).__name__} checkpoint cannot express this plan ({plan.summary()}): "
            "only whole-block removal maps onto the stock architecture; save without export= or with "
            "export='remote_code' instead"
        )
    with adapter.plain_export():
        pruned.model.save_pretrained(directory, **kwargs)
