"""The docstring rule, checked statically with ``ast`` (no import of the package, so it is fast):
"Public functions have docstrings with tensor shapes, errors raised, and the source (paper,
equation, EasyEdit function mirrored)."

What counts as public, per module of ``easyedit_replay/`` (every ``*.py`` below it):

* module-level functions whose name does not start with ``_``;
* methods of module-level classes whose names do not start with ``_``, the method name not
  starting with ``_`` either (properties included: they are read as attributes, so they say
  what they return). Dunder methods are skipped, except ``__init__`` when it takes parameters
  besides ``self``: its docstring may live on ``__init__`` or on the class;
* functions nested in functions, and nested classes, are private to their owner and skipped;
  so are ``@overload`` stubs and ``@x.setter`` / ``@x.deleter`` halves of a documented property.

Three checks:

1. every public function has a docstring;
2. every public function whose own body (not a nested function's) holds a ``raise`` of a named
   exception has a ``Raises:`` section. Not counted: a bare ``raise`` and ``raise err`` of a name
   bound by an enclosing ``except ... as err`` (re-raises: the error is the callee's), and the
   ``raise NotImplementedError`` of an abstract stub (a body that is only a docstring and that
   raise). For ``__init__`` the section may be in the class docstring;
3. every public function in ``easyedit_replay/algorithms/`` and ``easyedit_replay/targets/``
   that computes math names its source. "Computes math" is read as: its own body has a matrix
   product (``@``) or calls one of ``MATH_CALLS`` under ``torch`` (``torch.inverse``,
   ``torch.linalg.solve``, ...). "Names its source" is a keyword test on its docstring
   (``SOURCE_PATTERN``, whole words, any case): EasyEdit, paper, et al., eq./equation, arXiv,
   mirrors, Sherman-Morrison, or "ours" / "this project" for what this package introduces.
   It checks that a source is named, not that it is the right one.

``DOCSTRINGS_OWED`` would list functions that predate the rule (it is empty); it may only
shrink (a listed function that now passes fails the test, so the list stays honest).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "easyedit_replay"
SOURCE_PATTERN = re.compile(r"\b(easyedit|paper|et al\.|eqs?\.|equations?|arxiv|mirror(s|ed)?|"
                            r"sherman-morrison|ours|this project)", re.IGNORECASE)
MATH_CALLS = {"inverse", "pinv", "solve", "lstsq", "svd", "eigh", "cholesky", "qr", "matmul", "mm",
              "bmm", "einsum", "outer"}
MATH_PACKAGES = ("algorithms", "targets")

# docstrings owed: "module.path:qualname" -> which check it fails ("docstring", "raises",
# "source"). Remove an entry when its docstring is written. Empty: every public function
# passes; keep it that way rather than adding entries.
DOCSTRINGS_OWED: dict[str, set[str]] = {}


def _modules(root: Path = PACKAGE):
    for path in sorted(root.rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def _decorator_names(node) -> set[str]:
    names = set()
    for dec in node.decorator_list:
        if isinstance(dec, ast.Call):
            dec = dec.func
        if isinstance(dec, ast.Name):
            names.add(dec.id)
        elif isinstance(dec, ast.Attribute):
            names.add(dec.attr)
    return names


def _takes_parameters(fn) -> bool:
    a = fn.args
    return len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) > 1 or bool(a.vararg or a.kwarg)


def public_functions(tree):
    """Yield ``(qualname, function node, owning class node or None)`` for the public functions."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if not node.name.startswith("_") and "overload" not in _decorator_names(node):
                yield node.name, node, None
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if not isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                decorators = _decorator_names(item)
                if "overload" in decorators or decorators & {"setter", "deleter"}:
                    continue
                if item.name == "__init__":
                    if _takes_parameters(item):
                        yield f"{node.name}.__init__", item, node
                elif not item.name.startswith("_"):
                    yield f"{node.name}.{item.name}", item, node


def _own_nodes(fn):
    """The nodes of ``fn``'s body, not descending into nested functions, lambdas or classes."""
    nested = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
    stack = [node for node in fn.body if not isinstance(node, nested)]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(child for child in ast.iter_child_nodes(node) if not isinstance(child, nested))


def _is_abstract_stub(fn) -> bool:
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    if len(body) != 1 or not isinstance(body[0], ast.Raise) or body[0].exc is None:
        return False
    exc = body[0].exc.func if isinstance(body[0].exc, ast.Call) else body[0].exc
    return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"


def raises_named_exception(fn) -> bool:
    if _is_abstract_stub(fn):
        return False
    caught = {n.name for n in _own_nodes(fn) if isinstance(n, ast.ExceptHandler) and n.name}
    for node in _own_nodes(fn):
        if isinstance(node, ast.Raise) and node.exc is not None:
            if isinstance(node.exc, ast.Name) and node.exc.id in caught:
                continue
            return True
    return False


def computes_math(fn) -> bool:
    for node in _own_nodes(fn):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
            return True
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in MATH_CALLS:
            f = node.func.value
            while isinstance(f, ast.Attribute):
                f = f.value
            if isinstance(f, ast.Name) and f.id == "torch":
                return True
    return False


def audit(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Every rule break under ``root``: ``"module:qualname" -> {"docstring", "raises", "source"}``."""
    found: dict[str, set[str]] = {}
    for path, tree in _modules(root):
        rel = path.relative_to(root.parent).with_suffix("")
        module = ".".join(rel.parts)
        math_module = len(rel.parts) > 2 and rel.parts[1] in MATH_PACKAGES
        for qualname, fn, cls in public_functions(tree):
            doc = ast.get_docstring(fn) or ""
            if fn.name == "__init__" and cls is not None:
                doc = doc + "\n" + (ast.get_docstring(cls) or "")
            broken = set()
            if not doc.strip():
                broken.add("docstring")
            if raises_named_exception(fn) and "Raises:" not in doc:
                broken.add("raises")
            if math_module and computes_math(fn) and not SOURCE_PATTERN.search(doc):
                broken.add("source")
            if broken:
                found[f"{module}:{qualname}"] = broken
    return found


def test_public_functions_have_docstrings_raises_and_sources():
    found = audit()
    new = {k: sorted(v - DOCSTRINGS_OWED.get(k, set())) for k, v in found.items()}
    new = {k: v for k, v in new.items() if v}
    assert not new, "docstring rule broken (see tests/test_docstrings.py):\n" + \
        "\n".join(f"  {k}: missing {', '.join(v)}" for k, v in sorted(new.items()))
    paid = {k: sorted(v - found.get(k, set())) for k, v in DOCSTRINGS_OWED.items()}
    paid = {k: v for k, v in paid.items() if v}
    assert not paid, "now passing, remove from DOCSTRINGS_OWED:\n" + \
        "\n".join(f"  {k}: {', '.join(v)}" for k, v in sorted(paid.items()))


def test_audit_catches_each_break(tmp_path):
    """The checker itself: a toy package with one break of each kind, and the exemptions."""
    pkg = tmp_path / "easyedit_replay"
    (pkg / "algorithms").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "algorithms" / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(
        "def bare(x):\n    return x\n\n"
        "def raiser(x):\n    '''Doc.'''\n    if x:\n        raise ValueError(x)\n\n"
        "def reraiser(x):\n    '''Doc.'''\n    try:\n        x()\n    except OSError as err:\n        raise err\n\n"
        "def nested_raise(x):\n    '''Doc.'''\n    def inner():\n        raise KeyError\n    return inner\n\n"
        "def _private(x):\n    raise ValueError\n\n"
        "class Base:\n    '''Doc.'''\n    def hook(self):\n        '''Doc.'''\n        raise NotImplementedError\n"
        "    def __repr__(self):\n        return ''\n"
        "    def __init__(self, a):\n        if a:\n            raise TypeError\n\n"
        "class Fine:\n    '''Doc.\n\n    Raises:\n        TypeError: when.\n    '''\n"
        "    def __init__(self, a):\n        raise TypeError\n")
    (pkg / "algorithms" / "rule.py").write_text(
        "import torch\n\n"
        "def solve(a, b):\n    '''Doc [d, d].'''\n    return a @ b\n\n"
        "def solve_cited(a, b):\n    '''Doc, Eq. 14 of the paper.'''\n    return torch.linalg.solve(a, b)\n\n"
        "def plain(a):\n    '''Doc.'''\n    return a + 1\n")
    assert audit(pkg) == {
        "easyedit_replay.mod:bare": {"docstring"},
        "easyedit_replay.mod:raiser": {"raises"},
        "easyedit_replay.mod:Base.__init__": {"raises"},
        "easyedit_replay.algorithms.rule:solve": {"source"},
    }


def test_owed_entries_name_real_functions():
    for entry in DOCSTRINGS_OWED:
        module, qualname = entry.split(":")
        path = ROOT.joinpath(*module.split(".")).with_suffix(".py")
        if not path.exists():
            path = ROOT.joinpath(*module.split("."), "__init__.py")
        assert qualname in {q for q, _, _ in public_functions(ast.parse(path.read_text()))}, entry
