"""The shape of the code: dependencies point one way (no import cycle among tierkv's modules, function-local
imports included), no module holds two concerns (none is past ~500 lines), and the KV bookkeeping and the
policies are plain Python (no torch anywhere below them)."""

import ast
import os
import re
from pathlib import Path

import tierkv

PACKAGE = Path(tierkv.__file__).parent  # kernels/, policies/ and configs/ are reached through links inside it


def modules() -> dict[str, Path]:
    found = {}
    for folder, _, files in os.walk(PACKAGE, followlinks=True):
        for name in files:
            if name.endswith(".py"):
                path = Path(folder, name)
                parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
                found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _runtime_imports(tree: ast.AST):
    """Import nodes that run (those under `if TYPE_CHECKING:` do not)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skip]


def import_graph(external: dict[str, set[str]] | None = None) -> dict[str, set[str]]:
    """Module -> the tierkv modules it imports. `external`, if given, collects each module's other imports (their
    top-level names)."""
    mods = modules()
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = []
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets += [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets += [f"{base}.{a.name}" for a in node.names] + [base]
        if external is not None:
            external[name] = {t.partition(".")[0] for t in targets if t and not t.startswith("tierkv")}
        edges = set()
        for target in targets:
            while target and target not in mods:
                target = target.rpartition(".")[0]
            # Importing a submodule runs its packages' __init__ first: that edge is the package's, not a cycle.
            if target and target != name and not name.startswith(target + "."):
                edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_among_tierkv_modules():
    graph = import_graph()
    assert "tierkv.kernels.paged_attention" in graph and "tierkv.policies.lru" in graph  # the links were followed
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


MAX_LINES = 500
# The page manager's bookkeeping and the policies: which block is where, decided without touching a tensor.
PLAIN_PYTHON = [
    "tierkv.kv.block",
    "tierkv.kv.slots",
    "tierkv.kv.ledger",
    "tierkv.kv.prefix_index",
    "tierkv.kv.spares",
    "tierkv.kv.transfer",
    "tierkv.kv.step_plan",
    "tierkv.kv.placement",
    "tierkv.policies.lru",
    "tierkv.policies.clock",
    "tierkv.policies.prefetch",
    "tierkv.policies.registry",
]


def test_no_module_is_past_the_size_of_one_concern():
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert len(sizes) > 40
    big = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines (split them by concern): {big}"


def test_the_bookkeeping_and_the_policies_import_no_torch():
    external: dict[str, set[str]] = {}
    graph = import_graph(external)
    for root in PLAIN_PYTHON:
        seen, todo = set(), [root]
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo += graph[name]
        heavy = {name: sorted(external[name] & {"torch", "numpy", "triton"}) for name in seen}
        heavy = {name: libs for name, libs in heavy.items() if libs}
        assert not heavy, f"{root} reaches modules that import {heavy}"


def test_the_torch_check_sees_a_torch_import():
    external: dict[str, set[str]] = {}
    import_graph(external)
    assert "torch" in external["tierkv.kv.mover"] and "torch" not in external["tierkv.kv.placement"]


README = PACKAGE.parent / "README.md"
FOUNDATION = {f"tierkv.{m}" for m in ("config", "errors", "handles", "layout", "sizes", "outputs")}


def readme_layers(columns: list[str] | None = None) -> list[set[str]]:
    """The modules of each row of the README's architecture table, top row first; `columns`, if given, collects
    each of those rows' last column (the tierkv modules it says the row imports)."""
    text = README.read_text()
    section = text[text.index("## How it is built") :]
    section = section[: section.index("\n## ", 5)]
    mods = modules()
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        names, folder = set(), ""
        for path in re.findall(r"`([\w/]+(?:\.py|/))`", line.split("|")[1]):
            if path.endswith("/"):  # a folder: every module in it
                prefix = "tierkv." + path.strip("/").replace("/", ".")
                if path in ("kernels/", "policies/"):
                    names |= {m for m in mods if m.startswith(prefix + ".")}
                continue
            if "/" in path:
                folder = path.rpartition("/")[0]
            else:
                path = f"{folder}/{path}"
            names.add(path.removesuffix(".py").replace("/", "."))
        if names:
            rows.append(names)
            if columns is not None:
                columns.append(line.rstrip(" |").rpartition(" | ")[2])
    return rows


def imports_of_row(graph: dict[str, set[str]], names: set[str]) -> str:
    """What the README's last column should say for a row: the tierkv modules it imports (kernels/ and policies/ as
    one name each), beside its own and those beneath every row."""
    out = set()
    for target in set().union(*(graph[n] for n in names)) - FOUNDATION - names:
        target = target.removeprefix("tierkv.")
        out.add(target.partition(".")[0] if target.startswith(("kernels.", "policies.")) else target)
    return ", ".join(sorted(out)) or "-"


def test_the_readme_architecture_table_matches_the_imports():
    graph = import_graph()
    columns: list[str] = []
    rows = readme_layers(columns)
    for names, said in zip(rows, columns):
        assert said == imports_of_row(graph, names), (
            f"README row {sorted(names)} says it imports {said!r}; the code imports {imports_of_row(graph, names)!r}"
        )
    row_of = {}
    for i, names in enumerate(rows):
        for name in names:
            assert name in graph, f"README names {name}, which is not a module"
            row_of[name] = i
    packages = {name for name, path in modules().items() if path.name in ("__init__.py", "__main__.py")}
    packages |= {name for name in graph if name.endswith("__main__")}
    missing = set(graph) - set(row_of) - FOUNDATION - packages
    assert not missing, f"modules the README's architecture table does not place: {sorted(missing)}"
    for name in FOUNDATION:
        assert graph[name] <= FOUNDATION, f"{name} is beneath every row but imports {graph[name] - FOUNDATION}"
    for name, i in row_of.items():
        for target in graph[name] - FOUNDATION:
            assert row_of.get(target, -1) >= i, (
                f"{name} (README row {i + 1}) imports {target} (row {row_of.get(target, '?') if target in row_of else '?'}): "
                "a row may import only its own row and those below it"
            )
