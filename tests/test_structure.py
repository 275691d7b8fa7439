"""The package's shape: one-way imports, the optimizer's weight-decay groups, the scoring device."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest
import torch

import finetune
from finetune import evaluation
from finetune.engine import build_optimizer
from finetune.loading import load_model
from finetune.recipes import load_recipe

PACKAGE = Path(finetune.__file__).resolve().parent


def package_imports(package: Path = PACKAGE) -> Dict[str, Set[str]]:
    """module -> the package modules it imports anywhere in its body (functions included).
    A subpackage (finetune/data/) is one node: the union of its files' imports."""
    sources = {p.stem: [p] for p in package.glob("*.py")}
    sources.update({d.name: sorted(d.glob("*.py")) for d in package.iterdir()
                    if d.is_dir() and (d / "__init__.py").exists()})
    graph: Dict[str, Set[str]] = {}
    for name, paths in sources.items():
        found: Set[str] = set()
        for path in paths:
            depth = 1 if path.parent == package else 2  # `from .x` in the package, `from ..x` in a subpackage
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.level == depth:
                    if node.module:
                        found.add(node.module.split(".")[0])
                    else:  # from . import a, b
                        found.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("finetune."):
                    found.add(node.module.split(".")[1])
                elif isinstance(node, ast.Import):
                    found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("finetune."))
        graph[name] = {m for m in found if m in sources and m != name}
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import cycle as a list of modules (first == last), or [] when there is none."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return []


def test_the_package_has_no_import_cycle_counting_imports_inside_functions():
    graph = package_imports()
    assert {"engine", "rundir", "evaluation", "cli", "soup", "compare", "data"} <= set(graph)
    assert "recipes" in graph["data"] and "errors" in graph["data"]  # the subpackage's `from ..x` imports count
    assert find_cycle(graph) == [], f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_cycle_finder_sees_a_cycle_hidden_in_a_function(tmp_path):
    (tmp_path / "a.py").write_text("from . import b\n")
    (tmp_path / "b.py").write_text("def late():\n    from .c import x\n")
    (tmp_path / "c.py").write_text("def later():\n    from finetune.a import y\n")
    assert find_cycle(package_imports(tmp_path)) == ["a", "b", "c", "a"]


def test_data_flows_one_way_library_modules_never_import_the_cli():
    graph = package_imports()
    importers_of_cli = sorted(m for m, deps in graph.items() if "cli" in deps and m != "__main__")
    assert importers_of_cli == []
    for library in ("soup", "compare", "engine", "evaluation", "rundir"):
        source = (PACKAGE / f"{library}.py").read_text()
        assert "import click" not in source, f"{library}.py imports click"
    assert "engine" not in graph["evaluation"] and "engine" not in graph["rundir"]


def test_cls_token_pos_embed_biases_and_norms_get_no_weight_decay():
    model = load_model("scratch:patch_size=8,embed_dim=32,depth=2,num_heads=2", num_classes=3, img_size=32)
    recipe = load_recipe("demo", ["optimizer.weight_decay=0.05"])
    optimizer = build_optimizer(recipe, model)
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    names = dict(model.named_parameters())
    assert len(decay_of) == len(names)  # every parameter is trained, once
    undecayed = {n for n, p in names.items() if decay_of[id(p)] == 0.0}
    decayed = {n for n, p in names.items() if decay_of[id(p)] == 0.05}
    assert {"cls_token", "pos_embed", "norm.weight", "norm.bias", "blocks.0.norm1.weight",
            "blocks.0.attn.qkv.bias", "head.bias", "patch_embed.proj.bias"} <= undecayed
    assert {"blocks.0.attn.qkv.weight", "blocks.1.mlp.fc1.weight", "head.weight",
            "patch_embed.proj.weight"} <= decayed
    assert undecayed | decayed == set(names)


def test_sgd_is_plain_momentum_sgd_as_the_recipes_document():
    model = load_model("scratch:patch_size=8,embed_dim=32,depth=1,num_heads=2", num_classes=3, img_size=32)
    optimizer = build_optimizer(load_recipe("demo", ["optimizer.name=sgd", "optimizer.momentum=0.9"]), model)
    assert isinstance(optimizer, torch.optim.SGD)
    assert all(g["momentum"] == 0.9 and not g["nesterov"] for g in optimizer.param_groups)


def test_scoring_uses_cuda_when_present_else_the_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert evaluation.choose_device().type == expected
    assert evaluation.choose_device("cpu").type == "cpu"


def test_a_scored_checkpoint_lands_on_the_chosen_device(tmp_path):
    model = load_model("scratch:patch_size=8,embed_dim=32,depth=1,num_heads=2", num_classes=3, img_size=32)
    finetune.save_checkpoint(tmp_path / "m.safetensors", model)
    scored = evaluation.load_for_scoring(tmp_path / "m.safetensors")
    assert next(scored.parameters()).device.type == evaluation.choose_device().type


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_asking_for_cuda_without_it_is_a_one_line_error():
    with pytest.raises(finetune.FinetuneError, match="CUDA is not available"):
        evaluation.choose_device("cuda")


def test_the_suite_refuses_every_connection_but_loopback():
    import socket
    import conftest
    before = len(conftest._OUTSIDE_CONNECTIONS)
    with pytest.raises(OSError):
        socket.getaddrinfo("example.com", 443)
    with pytest.raises(OSError):
        socket.create_connection(("93.184.215.14", 80), timeout=1)
    assert len(conftest._OUTSIDE_CONNECTIONS) == before + 2
    del conftest._OUTSIDE_CONNECTIONS[before:]  # seen and expected: not this test's failure
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    socket.create_connection(server.getsockname(), timeout=1).close()  # loopback stays open
    server.close()


PRIVATE_ENVIRONMENT = ("FINETUNE_CACHE_DIR", "TORCH_HOME", "HF_HOME")


@pytest.fixture(scope="module")
def environment_of_a_module_fixture():
    """What a module-scoped fixture (the tiny runs several test files share) sees: pytest sets these
    up before any function-scoped fixture, conftest's offline_caches included."""
    import os
    return {key: os.environ.get(key) for key in (*PRIVATE_ENVIRONMENT, "HF_HUB_OFFLINE", "FINETUNE_OFFLINE")}


def test_module_fixtures_run_offline_with_private_caches(environment_of_a_module_fixture, tmp_path_factory):
    seen = environment_of_a_module_fixture
    assert seen["HF_HUB_OFFLINE"] == "1" and seen["FINETUNE_OFFLINE"] == "1", seen
    base = tmp_path_factory.getbasetemp().resolve()
    for key in PRIVATE_ENVIRONMENT:  # never the user's ~/.cache, where the suite once wrote verdicts
        assert seen[key] and Path(seen[key]).resolve().is_relative_to(base), (key, seen[key])
