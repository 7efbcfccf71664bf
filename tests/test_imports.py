"""The package's import graph, read with ``ast`` only (nothing is imported): no import circle among contrareg_tf's
modules, counting module-level and function-level imports alike, and every import inside a function either of an
optional / heavy package or carrying a ``# lazy: <reason>`` comment on its line or the line above.

Graph conventions: a module is a node by its dotted name (a package's ``__init__.py`` is the package's own node);
relative imports are resolved against the importing file's package; ``from pkg import name`` is an import of the
module ``pkg.name`` where that module exists, else of ``pkg``; ``import a.b.c`` is an import of the longest prefix of
``a.b.c`` that is a module of the package. The implicit import of parent packages' ``__init__`` is not an edge
(every submodule import would otherwise close a circle through its package).
"""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "contrareg_tf"

# optional or heavy packages a function may import where it is used (plotting, progress bars, the peer libraries
# of the cross-checks); anything else lazy needs a `# lazy: <reason>` comment
LAZY_ALLOWED = frozenset({"matplotlib", "nilearn", "ants", "itk", "torch", "tqdm", "SimpleITK"})
_LAZY_REASON = re.compile(r"#\s*lazy:\s*\S")


def module_files(root, package):
    """{dotted module name: path} of every ``.py`` file under ``root/package`` (``__init__`` -> the package)."""
    out = {}
    for dirpath, dirnames, files in os.walk(os.path.join(root, package)):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            path = os.path.join(dirpath, f)
            parts = os.path.relpath(path, root)[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(tree):
    """(node, inside_function) for every Import / ImportFrom in ``tree``."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


def _base(module, is_package, node):
    """The absolute dotted module an ``ImportFrom`` names (its ``module`` resolved against ``level``)."""
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[:len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _nearest(name, modules):
    """The longest dotted prefix of ``name`` that is one of ``modules`` (None if none is)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def import_graph(root, package):
    """{module: {imported module of the package: [(path, line, inside_function), ...]}}."""
    files = module_files(root, package)
    graph = {m: {} for m in files}
    for module, path in files.items():
        is_package = os.path.basename(path) == "__init__.py"
        for node, in_function in _imports(ast.parse(open(path, encoding="utf-8").read(), path)):
            if isinstance(node, ast.Import):
                targets = [_nearest(alias.name, files) for alias in node.names]
            else:
                base = _base(module, is_package, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else _nearest(base, files)
                           for a in node.names]
            for target in filter(None, targets):
                if target != module or not is_package:         # `from . import x` inside pkg/__init__
                    graph[module].setdefault(target, []).append((path, node.lineno, in_function))
    return graph


def find_cycles(graph):
    """One circle (a list of modules, first == last) per strongly connected component that has one (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def strongconnect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strongconnect(w)
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
            if len(component) > 1 or v in graph.get(v, ()):
                components.append(set(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return [_circle_in(graph, component) for component in components]


def _circle_in(graph, component):
    """A shortest circle through the first (sorted) module of a strongly connected component (breadth-first)."""
    start = sorted(component)[0]
    previous, frontier = {start: None}, [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while previous[path[-1]] is not None:
                        path.append(previous[path[-1]])
                    return [start] + path[::-1][1:] + [start]
                if w in component and w not in previous:
                    previous[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError("a strongly connected component without a circle")


def unreasoned_lazy_imports(root, package):
    """``path:line  import ...`` for every function-level import of a package outside ``LAZY_ALLOWED`` without a
    ``# lazy: <reason>`` comment on one of its lines or the line above."""
    bad = []
    for path in module_files(root, package).values():
        source = open(path, encoding="utf-8").read()
        lines = source.splitlines()
        for node, in_function in _imports(ast.parse(source, path)):
            if not in_function:
                continue
            if isinstance(node, ast.Import):
                tops = {alias.name.split(".")[0] for alias in node.names}
            else:
                tops = {"." if node.level else node.module.split(".")[0]}
            if tops <= LAZY_ALLOWED:
                continue
            own = lines[node.lineno - 1:node.end_lineno]
            above = lines[node.lineno - 2] if node.lineno > 1 else ""
            if any(_LAZY_REASON.search(ln) for ln in own) or (above.strip().startswith("#")
                                                               and _LAZY_REASON.search(above)):
                continue
            bad.append(f"{os.path.relpath(path, root)}:{node.lineno}  {lines[node.lineno - 1].strip()}")
    return bad


# --- the package -------------------------------------------------------------------------------------------------

def test_no_import_circle():
    graph = import_graph(ROOT, PACKAGE)
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100      # the walk found the package
    cycles = find_cycles(graph)
    assert not cycles, "import circles (module-level and function-level imports):\n" + "\n".join(
        " -> ".join(c) for c in cycles)


def test_function_level_imports_have_a_reason():
    bad = unreasoned_lazy_imports(ROOT, PACKAGE)
    assert not bad, ("imports inside functions: move them to the top of the file, or give a `# lazy: <reason>` "
                     "comment:\n" + "\n".join(bad))


# --- the checks themselves, on planted packages -------------------------------------------------------------------

def _write(tmp_path, files):
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_circle_found_through_relative_and_function_level_imports(tmp_path):
    _write(tmp_path, {
        "pk/__init__.py": "from . import a\n",
        "pk/a.py": "from .sub import b\n",                        # `from pkg import name`, name a module
        "pk/sub/__init__.py": "",
        "pk/sub/b.py": "def f():\n    from ..c import g\n",        # function-level, two dots
        "pk/c.py": "import pk.a as a\ndef g():\n    pass\n",          # absolute, closes a -> b -> c -> a
        "pk/d.py": "from pk import c\n",                            # outside the circle
    })
    graph = import_graph(str(tmp_path), "pk")
    assert graph["pk.a"] == {"pk.sub.b": [(str(tmp_path / "pk/a.py"), 1, False)]}
    assert set(graph["pk.sub.b"]) == {"pk.c"} and graph["pk.sub.b"]["pk.c"][0][2] is True
    assert find_cycles(graph) == [["pk.a", "pk.sub.b", "pk.c", "pk.a"]]


def test_no_circle_when_the_back_edge_is_to_a_name_of_the_package(tmp_path):
    _write(tmp_path, {
        "pk/__init__.py": "from .a import f\n",                     # pk -> pk.a
        "pk/a.py": "def f():\n    pass\n",
        "pk/b.py": "from pk import f\nfrom . import a\n",           # pk.b -> pk (a name), pk.b -> pk.a
    })
    graph = import_graph(str(tmp_path), "pk")
    assert graph == {"pk": {"pk.a": [(str(tmp_path / "pk/__init__.py"), 1, False)]}, "pk.a": {},
                     "pk.b": {"pk": [(str(tmp_path / "pk/b.py"), 1, False)],
                              "pk.a": [(str(tmp_path / "pk/b.py"), 2, False)]}}
    assert find_cycles(graph) == []
    _write(tmp_path, {"pk/a.py": "def f():\n    from pk.b import x\n"})    # now pk -> a -> b -> pk
    assert find_cycles(import_graph(str(tmp_path), "pk")) == [["pk", "pk.a", "pk.b", "pk"]]


def test_unreasoned_lazy_imports_listed(tmp_path):
    _write(tmp_path, {
        "pk/__init__.py": "import os\n",
        "pk/a.py": ("import json\n"
                    "def f():\n"
                    "    import matplotlib.pyplot as plt\n"             # allowed package
                    "    import numpy as np\n"                          # 4: flagged
                    "    # lazy: after the environment is set\n"
                    "    import tensorflow as tf\n"                     # reason on the line above
                    "    from . import b  # lazy: b imports a\n"        # reason on its line
                    "    from .b import (x,\n"
                    "                    y)\n"                          # 8: flagged
                    "    import resource\n"                             # 10: stdlib is not exempt
                    "    x = 1  # lazy: not a comment line\n"
                    "    import os\n"                                   # 12: the line above is code
                    "class C:\n"
                    "    def m(self):\n"
                    "        from tqdm import tqdm\n"                   # allowed
                    "        import torch, json\n"),                    # 16: json is not allowed
        "pk/b.py": "x = y = 0\n",
    })
    a = os.path.join("pk", "a.py")
    assert unreasoned_lazy_imports(str(tmp_path), "pk") == [
        f"{a}:4  import numpy as np", f"{a}:8  from .b import (x,", f"{a}:10  import resource",
        f"{a}:12  import os", f"{a}:16  import torch, json"]
