"""The import direction of agent/, read from the modules' own import statements.

Imports point one way, from the top down:

    cli -> commission, service -> config -> uplink, poller, energy -> store, clock -> base -> drivers

A module may import its own package and any package ranked below it; packages of the same rank
(commission and service, uplink and poller, store and clock) do not import each other. drivers/
never imports agent/ or simulator/; simulator/ never imports agent/; center/ and the rest import
nothing of each other. No two modules import each
other, directly or round a circle. Every import counts, also one inside a function or under
`if TYPE_CHECKING:`: a circle hidden from the interpreter is still a circle for the reader.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

RANK = {
    "agent.cli": 6,
    "agent.commission": 5, "agent.service": 5,
    "agent.config": 4,
    "agent.uplink": 3, "agent.poller": 3, "agent.energy": 3,
    "agent.store": 2, "agent.clock": 2,
    "agent": 1,  # base modules: the version, logutil
    "drivers": 0,
}


def layer(module: str) -> str | None:
    """The layer a module belongs to: the longest RANK key that is the module or a package of it."""
    best = None
    for name in RANK:
        if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best)):
            best = name
    return best


TOPS = ("agent", "drivers", "simulator", "center")


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for agent/, drivers/ and simulator/ under root."""
    found: dict[str, Path] = {}
    for top in TOPS:
        for path in sorted((root / top).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(path: Path, name: str, known: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import of one of our modules in the file."""
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from _ours(alias.name, node.lineno, known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join([*pkg, base] if base else pkg)
            for alias in node.names:  # `from agent.store import buffer` imports agent.store.buffer
                sub = f"{base}.{alias.name}"
                yield from _ours(sub if sub in known else base, node.lineno, known)


def _ours(module: str, line: int, known: dict[str, Path]) -> Iterator[tuple[str, int]]:
    if module.split(".")[0] in TOPS:
        yield module, line


def violations(root: Path) -> list[str]:
    """Every upward or sideways import and every circle, as `file:line: what`."""
    known = modules(root)
    problems: list[str] = []
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        where = path.relative_to(root)
        for target, line in imports(path, name, known):
            if target != name and target in known:
                graph[name].add(target)
            why = _direction(name, target)
            if why:
                problems.append(f"{where}:{line}: {name} imports {target}: {why}")
    problems += [f"import circle: {' -> '.join([*c, c[0]])}" for c in circles(graph)]
    return problems


def _direction(name: str, target: str) -> str | None:
    top, target_top = name.split(".")[0], target.split(".")[0]
    if top == "center" or target_top == "center":  # the center is another party: only the contract joins them
        return None if top == target_top else "center/ and the other packages import nothing of each other"
    if top == "simulator":
        return "the simulator may import drivers/ only" if target_top == "agent" else None
    if top == "drivers":
        return "drivers/ imports nothing of agent/ or simulator/" if target_top != "drivers" else None
    if target_top == "simulator":
        return "the agent runs the simulator as a process, never imports it"
    mine, theirs = layer(name), layer(target)
    if mine is None or theirs is None or mine == theirs or theirs == "agent" and target == "agent":
        return None
    if RANK[theirs] > RANK[mine]:
        return f"upward ({mine} is below {theirs})"
    if RANK[theirs] == RANK[mine]:
        return f"sideways ({mine} and {theirs} are of one rank)"
    return None


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each as a list of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found
