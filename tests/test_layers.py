"""The house stays as designed: every import in herd/ runs downhill (STYLE.md's floors), no file grows past its size,
and import cycles stay inside one folder. An AST walk, so imports inside functions count too; `from herd.x import y`
counts as importing herd.x.y when that is a module. Seconds, no model."""

import ast
from collections import defaultdict
from pathlib import Path

import pytest

HERD = Path(__file__).resolve().parent.parent / "herd"

# floor -> the modules (or folders) on it; a module may import its own folder or a lower floor, nothing else
FLOORS = {
    1: ["herd.errors", "herd.config", "herd.data"],
    2: ["herd.ops"],
    3: ["herd.models"],
    4: ["herd.quant"],
    5: ["herd.tokenizer", "herd.chat_format", "herd.images", "herd.image_prompts"],
    6: ["herd.formats"],
    7: ["herd.hub"],
    8: ["herd.engine"],
    9: ["herd.api", "herd"],  # herd/__init__.py hands herd.load on
    10: ["herd.server", "herd.train", "herd.eval", "herd.chat"],
    11: ["herd.cli", "herd.__main__"],
}
MAX_LINES = 650
MAX_TOP_LEVEL = 10  # modules directly under herd/, besides __init__.py and __main__.py


def module_name(path: Path) -> str:
    parts = path.relative_to(HERD.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in HERD.rglob("*.py")}


def home(module: str) -> tuple[int, str]:
    """(floor, folder) of a module: the floor of the longest FLOORS entry it is or lies under, and its folder
    (herd for the modules directly under herd/, herd.models for herd/models/...)."""
    best = None
    for floor, names in FLOORS.items():
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best[1])):
                best = (floor, name)
    if best is None:
        raise AssertionError(f"{module} has no floor: add it to FLOORS (tests/test_layers.py) and STYLE.md's plan")
    path = MODULES[module]
    folder = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return best[0], folder


def imports_of(module: str) -> set[str]:
    """herd modules this module imports, anywhere in it (functions included)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            if name == "herd" or name.startswith("herd."):
                while name not in MODULES:  # herd.x.y where y is a name inside module herd.x
                    name = name.rpartition(".")[0]
                found.add(name)
    found.discard(module)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_import_runs_downhill():
    upward = []
    for module, targets in sorted(GRAPH.items()):
        floor, group = home(module)
        for target in sorted(targets):
            t_floor, t_group = home(target)
            if t_floor > floor or (t_floor == floor and t_group != group):
                upward.append(f"{module} (floor {floor}) imports {target} (floor {t_floor})")
    assert not upward, "imports that run up or sideways:\n" + "\n".join(upward)


def test_the_rules_can_fail():
    """The walk sees imports inside functions and names imported from modules."""
    assert "herd.quant.model" in GRAPH["herd.api"]  # `from herd.quant.model import ...` inside load()
    assert home("herd.models.llama") == (3, "herd.models")
    assert home("herd.engine.vision_step") == (8, "herd.engine")
    assert home("herd.chat") == (10, "herd") and home("herd.server.app") == (10, "herd.server")


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of more than one module."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycles_stay_inside_one_folder():
    cycles = strongly_connected(GRAPH)
    across = [c for c in cycles if len({m.rpartition(".")[0] for m in c}) > 1]
    assert not across, f"import cycles across folders: {across}"
    assert len(cycles) <= 2, f"{len(cycles)} import cycles (at most 2, each inside one folder): {cycles}"


def test_models_import_no_engine_format_or_runtime():
    for module, targets in GRAPH.items():
        if module.startswith("herd.models"):
            bad = [t for t in targets if t.split(".")[1] in ("engine", "quant", "formats", "server", "train", "eval")]
            assert not bad, f"{module} imports {bad}"


@pytest.mark.parametrize("path", sorted(HERD.rglob("*.py")), ids=lambda p: str(p.relative_to(HERD)))
def test_no_file_is_too_long(path):
    n = len(path.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(HERD)} has {n} lines (at most {MAX_LINES}): split it by concept"


def test_few_top_level_modules():
    top = sorted(p.name for p in HERD.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert len(top) <= MAX_TOP_LEVEL, f"{len(top)} modules directly under herd/: {top}"


def test_each_floor_says_what_it_holds():
    """Every folder's face (__init__.py or its main module) opens with a docstring saying what it may import."""
    for folder in sorted(p for p in HERD.iterdir() if p.is_dir() and (p / "__init__.py").exists()):
        if folder.name in ("data",):
            continue
        texts = [ast.get_docstring(ast.parse(f.read_text(encoding="utf-8"))) or "" for f in folder.glob("*.py")]
        assert any("import" in t and ("floor" in t.lower() or "Floor" in t) for t in texts), \
            f"herd/{folder.name}/: no module docstring says what this floor holds and may import"
