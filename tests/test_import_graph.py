"""The repository's modules form a DAG: no module imports one that imports it back, directly or
through others, counting imports inside functions; and imports sit at the top of a module, except
the optional heavy dependencies below.

Each rule is shown to fail on a copy of the modules with one deliberate breach."""
import ast
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Entry points (DESIGN.md): scripts that stand on the rooms and that no module imports.
ENTRY_SCRIPTS = {"train", "make_grid_data", "compare_runs", "tiny_warm", "tiny_spatial", "id_diagnostics", "reproduce",
                 "preemptible_torchrun"}
# Imported inside the function that needs them: each is heavy or installed only for some runs.
OPTIONAL_LATE_IMPORTS = {"peft", "matplotlib", "wandb", "torch.utils.tensorboard", "liger_kernel", "sklearn", "pyarrow"}


def _imported_names(node):
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module]
    return []


def _outside_functions(tree):
    """The module's statements, `if __name__ == "__main__":` and `try:` blocks included, without
    descending into a function or class body."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            pending.extend(ast.iter_child_nodes(node))


def import_graph(folder):
    """({module: set of repository modules it imports anywhere in its body}, [(module, line,
    imported name) of every import that is not at the module's top level])."""
    modules = {path.stem: ast.parse(path.read_text(), str(path)) for path in sorted(Path(folder).glob("*.py"))}
    edges, late = {}, []
    for name, tree in modules.items():
        top_level = {id(node) for node in _outside_functions(tree)}
        edges[name] = set()
        for node in ast.walk(tree):
            for imported in _imported_names(node):
                root = imported.split(".")[0]
                if root in modules and root != name:
                    edges[name].add(root)
                if id(node) not in top_level:
                    late.append((name, node.lineno, imported))
    return edges, late


def find_cycle(edges):
    """One import cycle as [a, b, ..., a], or None."""
    state = {}  # module -> "open" while on the DFS path, "done" after

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(edges):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def entry_script_importers(edges):
    """{entry script: [modules that import it]}, for the entry scripts that something imports."""
    found = {script: sorted(m for m, imported in edges.items() if script in imported) for script in ENTRY_SCRIPTS}
    return {script: modules for script, modules in found.items() if modules}


def misplaced_imports(late):
    return [(module, line, name) for module, line, name in late
            if not any(name == opt or name.startswith(opt + ".") for opt in OPTIONAL_LATE_IMPORTS)]


def test_the_modules_import_each_other_without_a_cycle():
    edges, _ = import_graph(REPO)
    assert len(edges) >= 15  # every top-level module was parsed
    assert find_cycle(edges) is None, f"import cycle: {' -> '.join(find_cycle(edges))}"


def test_imports_sit_at_the_top_except_optional_heavy_dependencies():
    _, late = import_graph(REPO)
    assert misplaced_imports(late) == []


def test_the_layering_points_down():
    """DESIGN's rooms: data stands below the models, the tiny models below the loader, the
    processor classes below both, drawing below the scripts that draw; no module imports an
    entry script."""
    edges, _ = import_graph(REPO)
    assert "models" not in edges["data"]
    assert "models" not in edges["tiny_models"]
    assert {"processors", "data"} <= edges["tiny_models"]
    for bottom in ("processors", "protocols", "provenance", "output_paths"):
        assert edges[bottom] == set(), bottom
    assert edges["render"] == {"data"} and "render" in edges["tiny_warm"] and "render" in edges["make_grid_data"]
    assert entry_script_importers(edges) == {}


def test_scoring_is_a_room_of_rules_below_inference():
    """DESIGN's scoring room: the rules of a measurement, imported by eval_coco and compare_runs,
    importing at most benchmarks and data, and no torch of its own."""
    edges, _ = import_graph(REPO)
    assert edges["scoring"] <= {"benchmarks", "data"}
    assert "scoring" in edges["eval_coco"] and "scoring" in edges["compare_runs"]
    assert not {"eval_coco", "models", "tiny_models"} & edges["scoring"]
    tree = ast.parse((REPO / "scoring.py").read_text())
    assert not [n for node in ast.walk(tree) for n in _imported_names(node) if n.split(".")[0] == "torch"]


@pytest.fixture
def copy_of_modules(tmp_path):
    for path in REPO.glob("*.py"):
        shutil.copy(path, tmp_path / path.name)
    return tmp_path


@pytest.mark.fast
def test_a_reverse_import_at_the_top_is_found(copy_of_modules):
    data_py = copy_of_modules / "data.py"
    data_py.write_text("import train\n" + data_py.read_text())
    edges, _ = import_graph(copy_of_modules)
    cycle = find_cycle(edges)
    assert cycle is not None and cycle[0] == cycle[-1] and {"data", "train"} <= set(cycle)


def test_a_reverse_import_hidden_in_a_function_is_found(copy_of_modules):
    models_py = copy_of_modules / "models.py"
    models_py.write_text(models_py.read_text() + "\n\ndef _late():\n    import checkpoints\n    return checkpoints\n")
    edges, late = import_graph(copy_of_modules)
    cycle = find_cycle(edges)
    assert cycle is not None and {"models", "checkpoints"} <= set(cycle)
    assert ("models", "checkpoints") in {(m, n) for m, _, n in misplaced_imports(late)}


def test_a_required_dependency_imported_in_a_function_is_found(copy_of_modules):
    data_py = copy_of_modules / "data.py"
    data_py.write_text(data_py.read_text() + "\n\ndef _late():\n    from transformers import AutoConfig\n")
    _, late = import_graph(copy_of_modules)
    assert [name for module, _, name in misplaced_imports(late) if module == "data"] == ["transformers"]
    assert find_cycle(import_graph(copy_of_modules)[0]) is None  # a late import is not a cycle by itself


def test_an_import_of_an_entry_script_is_found(copy_of_modules):
    warm = copy_of_modules / "tiny_warm.py"
    warm.write_text(warm.read_text().replace("import render\n", "import make_grid_data\n"))
    edges, _ = import_graph(copy_of_modules)
    assert find_cycle(edges) is None  # no cycle, but a room now stands on an entry script
    assert entry_script_importers(edges) == {"make_grid_data": ["tiny_warm"]}
