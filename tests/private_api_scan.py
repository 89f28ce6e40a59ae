"""Finds prefixtune's uses of transformers beyond its public API, by reading the source (AST).

What counts as a private use (each is reported with its file and line):

* an import from ``transformers.<module>`` of anything that is not the same object at the top
  level (``transformers.X`` is the public API; its submodules are internal), or of a module;
* an underscore name imported from transformers;
* an underscore attribute (``obj._x``, also as ``getattr(obj, "_x")`` or ``obj.__dict__.pop("_x")``)
  that prefixtune does not define itself and torch's ``nn.Module`` / ``Tensor`` do not have
  (so, in this code base, one of a transformers object);
* in a class deriving from a transformers class: a method or attribute it defines, or reaches
  through ``self``/``super()``, that the base class has under an underscore name (an override of
  a private hook).

What it cannot see: a public-looking attribute of an internal object (``state.position_offset``
on a continuous-batching ``RequestState``) or a function reached through ``sys.modules`` (the Gated
DeltaNet kernels in `injection.states`); those go through accessors in `transformers_private` by
hand, each with its entry. And it trusts names: an underscore attribute prefixtune defines itself
anywhere counts as its own everywhere.

`unregistered` returns the uses that no entry of `prefixtune.transformers_private.PRIVATE_APIS`
names: an import is covered by an entry of the same module (and object, when one is named), an
attribute by an entry whose last component is that attribute.
"""

from __future__ import annotations

import ast
import importlib
import types
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn

SOURCES = Path(__file__).parents[1] / "src" / "prefixtune"
ACCESS_FUNCTIONS = ("getattr", "hasattr", "setattr", "delattr")
DICT_METHODS = ("get", "pop", "setdefault")


@dataclass(frozen=True)
class Use:
    where: str  # "path:line"
    name: str  # "module:Object" for imports, "module:Base.attribute" for overrides, "._attribute" otherwise


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and not name.startswith("_prefixtune")


def _imported(module: str, name: str) -> object:
    """What ``from module import name`` gives (None: it is gone)."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


class _Scanner(ast.NodeVisitor):
    def __init__(self, path: str, own: set[str]) -> None:
        self.path, self.own = path, own
        self.uses: list[Use] = []
        self.transformers_names: dict[str, str] = {}  # local name -> "module:Object"
        # the transformers base of each enclosing class, and its name as imported ("module:Class"); None: not one
        self.bases: list[tuple[type, str] | None] = []

    def _add(self, node: ast.AST, name: str) -> None:
        self.uses.append(Use(f"{self.path}:{node.lineno}", name))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level == 0 and (module == "transformers" or module.startswith("transformers.")):
            for alias in node.names:
                self.transformers_names[alias.asname or alias.name] = f"{module}:{alias.name}"
                imported = _imported(module, alias.name)
                if isinstance(imported, types.ModuleType):
                    self._add(node, f"{module}.{alias.name}:")  # an internal module
                elif _is_private(alias.name) or getattr(transformers, alias.name, None) is not imported:
                    self._add(node, f"{module}:{alias.name}")

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.startswith("transformers."):
                self._add(node, f"{alias.name}:")

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        base = next(filter(None, (self._transformers_class(b) for b in node.bases)), None)
        if base is not None:
            for item in node.body:
                names = [item.name] if isinstance(item, ast.FunctionDef) else _assigned_names(item)
                for name in names:
                    if _is_private(name) and hasattr(base[0], name):
                        self._add(item, f"{base[1]}.{name}")
        self.bases.append(base)
        self.generic_visit(node)
        self.bases.pop()

    def _transformers_class(self, node: ast.expr) -> tuple[type, str] | None:
        """The transformers class a base-class expression names, with its "module:Class" name."""
        dotted = _dotted(node)
        if dotted is None or dotted.partition(".")[0] not in self.transformers_names:
            return None
        head, _, rest = dotted.partition(".")
        module, _, name = self.transformers_names[head].partition(":")
        if rest:  # `module_alias.Class`
            module, name = f"{module}.{name}", rest
        target = _imported(module, name)
        return (target, f"{module}:{name}") if isinstance(target, type) else None

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self._attribute(node, node.value, node.attr)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        function, args = node.func, node.args
        constant = None
        if isinstance(function, ast.Name) and function.id in ACCESS_FUNCTIONS and len(args) >= 2:
            receiver, constant = args[0], args[1]
        elif (
            isinstance(function, ast.Attribute)
            and function.attr in DICT_METHODS
            and isinstance(function.value, ast.Attribute)
            and function.value.attr == "__dict__"
            and args
        ):
            receiver, constant = function.value.value, args[0]
        if isinstance(constant, ast.Constant) and isinstance(constant.value, str):
            self._attribute(node, receiver, constant.value)
        self.generic_visit(node)

    def _attribute(self, node: ast.AST, receiver: ast.expr, name: str) -> None:
        if not _is_private(name):
            return
        base = self.bases[-1] if self.bases else None
        through_self = _is_self_or_super(receiver)
        if base is not None and through_self and hasattr(base[0], name):
            self._add(node, f"{base[1]}.{name}")
        elif through_self and base is None and name in self.own:
            return
        elif name not in self.own and not hasattr(nn.Module, name) and not hasattr(torch.Tensor, name):
            self._add(node, f".{name}")


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return None if head is None else f"{head}.{node.attr}"
    return None


def _is_self_or_super(node: ast.expr) -> bool:
    if isinstance(node, ast.Name):
        return node.id in ("self", "cls")
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"


def _assigned_names(node: ast.stmt) -> list[str]:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    return [target.id for target in targets if isinstance(target, ast.Name)]


def own_names(trees: Iterable[ast.AST]) -> set[str]:
    """Underscore names prefixtune defines itself: functions, classes, methods and module or class
    attributes, and attributes it assigns on ``self`` (not overrides: those are checked per class)."""
    own: set[str] = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                own.add(node.name)
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                own.update(_assigned_names(node))
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Attribute) and _is_self_or_super(target.value):
                        own.add(target.attr)
    return own


def private_uses(sources: dict[str, str]) -> list[Use]:
    """Every private transformers use in the given sources (path -> text), see module docstring.
    Names are "own" when any of the sources defines them."""
    trees = {path: ast.parse(text, filename=path) for path, text in sources.items()}
    own = own_names(trees.values())
    uses: list[Use] = []
    for path, tree in trees.items():
        scanner = _Scanner(path, own)
        scanner.visit(tree)
        uses += scanner.uses
    return uses


def covered(use: Use, registered: Iterable[str]) -> bool:
    """Whether a registry entry (``"module:Object.attribute"``) covers `use`."""
    for entry in registered:
        if use.name.startswith("."):
            if entry.rpartition(".")[2].rpartition(":")[2] == use.name[1:]:
                return True
        elif use.name.endswith(":"):  # a module
            if entry.partition(":")[0] == use.name[:-1]:
                return True
        elif entry == use.name or entry.startswith(f"{use.name}."):
            return True
    return False


def unregistered(sources: dict[str, str], registered: Iterable[str]) -> list[Use]:
    registered = list(registered)
    return [use for use in private_uses(sources) if not covered(use, registered)]


VLLM_PACKAGE = SOURCES / "vllm"  # vLLM's own internals, listed in prefixtune/vllm/vllm_private.py


def source_files() -> dict[str, str]:
    """prefixtune's sources that use transformers (the vLLM package talks to vLLM, not transformers)."""
    paths = [path for path in sorted(SOURCES.rglob("*.py")) if VLLM_PACKAGE not in path.parents]
    return {str(path.relative_to(SOURCES.parent)): path.read_text() for path in paths}
