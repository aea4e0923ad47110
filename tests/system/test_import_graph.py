"""The project's internal import graph (`retrieval`, `index`, `generation`, `serve`, `cli`) has no cycle, and its
packages are layers: imports only go down, retrieval <- index <- generation <- serve <- cli.

Every import counts, at module level and inside function bodies (a lazy import hides an edge, it does not remove
it); only imports under `if TYPE_CHECKING:` are left out, since they never run. `from a.b import c` is an edge to
the module `a.b.c` when that is a module, else to `a.b`. The graph is read from the source with `ast`, so nothing
is imported.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

from repo_paths import REPO

ROOT = REPO
PACKAGES = ("retrieval", "index", "generation", "serve", "cli")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:`."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _targets(module: str, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if modules[module].name == "__init__.py" else module.split(".")[:-1]
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    out = []
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != module:
            out.append(name)
    return out


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """module -> the internal modules it imports (read once per session)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in skip:
                graph[module].update(_targets(module, node, modules))
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """The cycles of the graph: its strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.add(w)
                    if w == v:
                        break
                if len(component) > 1:
                    out.append(component)
    return out


def test_the_graph_is_read():
    graph = import_graph()
    assert "retrieval.labels" in graph["retrieval.data.phantom.parse"]
    assert "index.search" in graph["serve.snapshot"]  # a function-level import counts
    assert "retrieval.data.phantom.rules" in graph["retrieval.data.phantom.parse"]  # `from pkg import module`


def test_strongly_connected_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert strongly_connected(graph) == [{"a", "b", "c"}]


def test_no_module_level_cycle():
    cycles = [sorted(c) for c in strongly_connected(import_graph())]
    assert not cycles, f"import cycles: {cycles}"


def test_the_study_text_and_labels_are_leaves():
    """The study's text imports nothing from the project, and the labels only it: every layer may use both."""
    graph = import_graph()
    assert graph["retrieval.study_text"] == set()
    assert graph["retrieval.labels"] == {"retrieval.study_text"}


def test_packages_import_only_downwards():
    """A module of one layer imports only its own package and the layers below it; no exception by name."""
    rank = {package: i for i, package in enumerate(PACKAGES)}
    upward = sorted(
        (m, t)
        for m, targets in import_graph().items()
        for t in targets
        if rank[t.split(".")[0]] > rank[m.split(".")[0]]
    )
    assert not upward, f"imports that go up a layer: {upward}"


def test_no_package_level_cycle():
    graph = import_graph()
    packages = {p: {t.split(".")[0] for m in graph if m.split(".")[0] == p for t in graph[m]} - {p} for p in PACKAGES}
    assert strongly_connected(packages) == []


# Private names (a leading underscore) imported across modules: each is a job with no public home. None is left
# (`cli.models_cmd` -> `bundle._size` became `model_status.format_size`); never add one: give the job a home.
KNOWN_PRIVATE_IMPORTS: set[tuple[str, str, str]] = set()


def private_imports(sources: dict[str, str] | None = None) -> set[tuple[str, str, str]]:
    """(importing module, imported module, name) for every `from internal.module import _name` in `sources`
    ({module: source}; default: the project's modules)."""
    if sources is None:
        sources = {module: path.read_text() for module, path in _modules().items()}
    out = set()
    for module, source in sources.items():
        for node in ast.walk(ast.parse(source, filename=module)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        out.add((module, node.module, alias.name))
    return out


def test_private_imports_are_found():
    source = "from retrieval.models.bundle import _size, write_checksums\nfrom os import _exit\nimport retrieval._x\n"
    assert private_imports({"cli.models_cmd": source}) == {("cli.models_cmd", "retrieval.models.bundle", "_size")}


def test_no_private_name_is_imported_across_modules_beyond_the_known_ones():
    found = private_imports()
    assert found <= KNOWN_PRIVATE_IMPORTS, sorted(found - KNOWN_PRIVATE_IMPORTS)
    assert KNOWN_PRIVATE_IMPORTS <= found, f"fixed, remove from KNOWN_PRIVATE_IMPORTS: {KNOWN_PRIVATE_IMPORTS - found}"


def test_the_index_package_is_layered():
    """layout (the on-disk format) imports no other index module; reading (store) imports only layout; writing
    (generations) and inspecting (verify) never import the build, and the build never imports the Searcher."""
    graph = import_graph()
    inside = {m: {t for t in graph[m] if t.startswith("index")} for m in graph if m.startswith("index")}
    assert inside["index.layout"] == set()
    assert inside["index.store"] == {"index.layout"}
    assert inside["index.backends"] <= {"index.tune"}
    for writer in ("index.generations", "index.verify", "index.shards", "index.merge", "index.rows"):
        assert not inside[writer] & {"index.build", "index.search"}, writer
    assert "index.search" not in inside["index.build"]


# generation/'s rooms, lowest first: a room imports only itself and the rooms before it (and the layers below).
GENERATION_ROOMS = ("model", "data", "heads", "writing", "evaluation", "training")


def test_the_generation_rooms_are_layered():
    """model (the VLM, LM, tokenizer, encoders) <- data (tasks, prompts, RAG, features) <- heads <- writing
    (Generator, reports) <- evaluation <- training (whose detector is scored with evaluation's mAP)."""
    rank = {room: i for i, room in enumerate(GENERATION_ROOMS)}
    graph = import_graph()
    rooms = {m: m.split(".")[1] for m in graph if m.startswith("generation.") and m.count(".") >= 2}
    assert set(rooms.values()) == set(GENERATION_ROOMS), "a module outside the rooms, or a room not in the order"
    upward = sorted((m, t) for m in rooms for t in graph[m] if t in rooms and rank[rooms[t]] > rank[rooms[m]])
    assert not upward, f"imports that go up a room: {upward}"
