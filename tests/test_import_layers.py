"""The package is layered: no import cycles, and inference never imports training code.

The import graph is read from the source with ``ast``, so function-local (lazy) imports count as
much as top-level ones. Its nodes are the modules of ``src/s2t`` (a package is its ``__init__``);
its edges, per import statement anywhere in a module:

- ``import s2t.a.b`` is an edge to ``s2t.a.b``;
- ``from s2t.a import b`` is an edge to ``s2t.a``, and also to ``s2t.a.b`` when that is a module;
- relative imports are resolved first; a module's imports of itself are dropped.

An import is an edge to the module it names, not to the packages above it. Python does run
``s2t/__init__.py`` (which imports ``s2t.api``) before ``s2t.policies.learned_selector``, but a package's
``__init__`` only re-exports: its own imports are the edges of its node (``s2t``), and any
module that imports the package explicitly (``import s2t``, ``from s2t import x``) gets an edge
to that node. So a cycle through a package ``__init__`` still shows up as a cycle here.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src"

# The README's layout, bottom up: a module imports only from its own layer and the ones below.
# A name ending in "/" stands for a package and every module in it.
LAYERS = {
    "foundations": [
        "s2t.runs",
        "s2t.run_driver",
        "s2t.data",
        "s2t.stats",
        "s2t.grading",
        "s2t.prompts",
        "s2t.builtin_models",
        "s2t.models",
        "s2t.distributed",
        "s2t.method_names",
    ],
    "decoding": [
        "s2t",
        "s2t.policies/",
        "s2t.engine",
        "s2t.teacher_forcing",
        "s2t.methods",
        "s2t.api",
        "s2t.backends/",
    ],
    "training": ["s2t.training/"],
    "experiments": [
        "s2t.evaluate",
        "s2t.evaluate_distributed",
        "s2t.analysis",
        "s2t.lm_eval_adapter",
        "s2t.reporting/",
        "s2t.serving/",
    ],
    "command line": ["s2t.cli/"],
}


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    modules = {}
    for path in sorted((SOURCE / "s2t").rglob("*.py")):
        parts = path.relative_to(SOURCE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


@cache
def import_graph() -> dict[str, frozenset[str]]:
    """Module -> the s2t modules it imports anywhere in its source (see the module docstring)."""
    files = module_files()
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                edges.add(target)
                edges.update(f"{target}.{alias.name}" for alias in node.names)
        graph[name] = frozenset(e for e in edges if e in files and e != name)
    return graph


def reachable(start: str) -> set[str]:
    """The modules ``start`` imports, directly or through others."""
    graph, seen, todo = import_graph(), set(), [start]
    while todo:
        for target in graph[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def import_cycles() -> list[list[str]]:
    """The modules of every import cycle, one sorted list per cycle (strongly connected component)."""
    cycles = {frozenset(m2 for m2 in reachable(m) if m in reachable(m2)) for m in import_graph()}
    return sorted(sorted(c) for c in cycles if c)


def test_the_graph_sees_function_local_imports():
    # the CLI imports the trainer only inside its `train` command
    assert "s2t.training.train" in import_graph()["s2t.cli.local"]
    # `from s2t.cli import analyze` is an edge to the module s2t.cli.analyze
    assert "s2t.cli.analyze" in import_graph()["s2t.cli"]


def test_no_two_modules_import_each_other_directly_or_through_others():
    cycles = import_cycles()
    assert cycles == [], "import cycles among: " + "; ".join(", ".join(c) for c in cycles)


def layer_of(module: str) -> int:
    """The index of ``module``'s layer in :data:`LAYERS`."""
    matches = [
        i
        for i, names in enumerate(LAYERS.values())
        for name in names
        if module == name.rstrip("/") or (name.endswith("/") and module.startswith(name[:-1] + "."))
    ]
    assert len(matches) == 1, f"{module} belongs to {len(matches)} layers; place it in LAYERS and the README"
    return matches[0]


def test_every_module_imports_only_its_own_layer_and_those_below():
    upward = [
        f"{m} -> {t}"
        for m, targets in import_graph().items()
        for t in sorted(targets)
        if layer_of(t) > layer_of(m)
    ]
    assert upward == []


def test_the_ray_runner_imports_no_other_s2t_module():
    assert import_graph()["s2t.distributed"] == frozenset()


# What decoding loads: the generator, the engine, the policies, methods, and the entry points
# that only decode (generate, serve, the lm-eval adapter).
DECODING_ENTRY_POINTS = [
    "s2t.api",
    "s2t.engine",
    "s2t.methods",
    "s2t.policies",
    "s2t.lm_eval_adapter",
    "s2t.cli.generate",
    "s2t.cli.serve",
    "s2t.serving",
]


def training_modules(modules) -> set[str]:
    return {m for m in modules if m == "s2t.training" or m.startswith("s2t.training.")}


@pytest.mark.parametrize("inference", DECODING_ENTRY_POINTS)
def test_decoding_never_imports_training_collection_or_evaluation_code(inference):
    reached = reachable(inference) | {inference}
    assert training_modules(reached) == set()
    assert reached & {"s2t.evaluate", "s2t.distributed"} == set()


@pytest.mark.parametrize("module", sorted(m for m in module_files() if m.startswith("s2t.policies")))
def test_no_policy_imports_training_code(module):
    assert training_modules(reachable(module)) == set()


@pytest.mark.parametrize("evaluation", ["s2t.evaluate", "s2t.evaluate_distributed"])
def test_evaluation_reaches_no_training_code(evaluation):
    assert training_modules(reachable(evaluation)) == set()


def test_the_trainers_share_code_through_a_module_below_both():
    graph = import_graph()
    assert "s2t.training.lora" not in reachable("s2t.training.objective")
    assert "s2t.training.train" not in reachable("s2t.training.lora")
    assert {"s2t.training.objective", "s2t.policies.learned_selector"} <= graph["s2t.training.train"] & graph[
        "s2t.training.lora"
    ]


def test_importing_the_generator_and_the_evaluator_loads_no_training_code():
    code = (
        "import sys, s2t.api, s2t.evaluate, s2t.evaluate_distributed\n"
        "import json\n"
        "print(json.dumps([sorted(m for m in sys.modules if m.startswith('s2t')),\n"
        "                  sorted(m for m in ('peft', 'ray') if m in sys.modules)]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SOURCE), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    modules, heavy = json.loads(result.stdout.splitlines()[-1])
    assert "s2t.evaluate" in modules
    assert training_modules(modules) == set()
    assert heavy == []
