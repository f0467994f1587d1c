"""The cell-kind registry: declarations without torch, one path for every kind, and no kind's name
in code outside its own module and the registry."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gradflow
import gradflow.models
import gradflow.tasks
from gradflow import GradflowError, kinds
from gradflow.kinds._elementwise import ElementwiseKind
from gradflow.kinds._layers import RecurrentLayer

ROOT = Path(__file__).resolve().parents[2]

# Kind or zoo names that may appear as a string in code outside the registry and the kind's own
# module, with the reason. Keep this list empty unless the string is a choice of model, not
# knowledge about a kind.
ALLOWED = {
    ("gradflow/training.py", "rnn_relu"):
        "clipping_experiment's default model (the exploding ReLU RNN), a choice of model like a spec's cell",
}


def _own_modules(kind) -> set[str]:
    module = kind.impl_path.partition(":")[0]
    return {str(Path(*module.split(".")).with_suffix(".py"))}


def test_no_kind_name_in_code_outside_its_module_and_the_registry():
    """`git grep` for a kind's name in gradflow's code (string constants: comparisons, tables, defaults;
    docstrings and messages that mention a kind in prose are not constants equal to the name) finds
    only the registry and the kind's own module."""
    names = {k.name: _own_modules(k) for k in kinds.kinds()}
    names.update({z: set() for z in kinds.zoo() if z not in names})  # presets: the registry only
    tracked = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "gradflow").rglob("*.py"))]
    assert "gradflow/kinds/__init__.py" in tracked and len(tracked) > 50
    found = []
    for f in tracked:
        if f == "gradflow/kinds/__init__.py":
            continue
        for node in ast.walk(ast.parse((ROOT / f).read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                if f not in names[node.value] and (f, node.value) not in ALLOWED:
                    found.append(f"{f}:{node.lineno}: {node.value!r}")
    assert not found, "kind names in code outside their module and the registry:\n" + "\n".join(found)


def test_registry_declarations_import_without_torch():
    """Names, descriptions, gates and the zoo come from gradflow.kinds without importing torch."""
    code = (
        "import sys, types\n"
        "sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        f"pkg = types.ModuleType('gradflow'); pkg.__path__ = [{str(ROOT / 'gradflow')!r}]\n"
        "sys.modules['gradflow'] = pkg\n"
        "import gradflow.kinds as K\n"
        "print(','.join(K.names())); print(','.join(K.zoo())); print(K.get('minlstm').gate_names)\n"
        "print(K.zoo()['lru'].description)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].split(",") == kinds.names()
    assert out[1].split(",") == list(kinds.zoo())
    assert out[2] == "('f', 'i')" and "ring" in out[3]


def test_every_kind_is_complete():
    for kind in kinds.kinds():
        impl = kind.impl
        assert impl.kind is kind and kind.structure in kinds.STRUCTURES
        assert len({g.label for g in kind.gates}) == len(kind.gates)
        if kind.structure != "dense":
            assert isinstance(impl, ElementwiseKind)
    assert {k.name for k in kinds.kinds() if k.structure == "diagonal"} == {"mingru", "minlstm", "indrnn"}
    assert kinds.get("lru").structure == "complex_diagonal"
    assert kinds.get("gru").gate_label("z") == "update gate z" != kinds.get("mingru").gate_label("z")
    assert kinds.for_gates(["z"]).name == "mingru" and kinds.for_gates(["n", "z", "r"]).name == "gru"
    assert kinds.for_gates(["q"]) is None and kinds.for_gates(["i"]).name == "lstm"
    zoo = kinds.zoo()
    assert zoo["irnn"].kind == "rnn_relu" and zoo["mgu"].kind == "custom" and "custom" not in zoo
    assert set(gradflow.models.list_cells()) == set(zoo)


def test_registry_errors_are_one_line():
    with pytest.raises(GradflowError, match="did you mean 'minlstm'") as e:
        kinds.get("minlstn")
    assert "\n" not in str(e.value)
    with pytest.raises(GradflowError, match="already registered"):
        kinds.register_kind(kinds.get("gru"))
    with pytest.raises(GradflowError, match="structure='banded'"):
        kinds.CellKind("x", "x", "m:a", structure="banded")
    with pytest.raises(GradflowError, match="module:attribute"):
        kinds.CellKind("x", "x", "nocolon")


# ------------------------------------------------------------------ a user's kind: one module, one registration
class Leaky(RecurrentLayer):
    """h_t = a ⊙ h_{t-1} + tanh(W x_t), a = σ(α) per unit: a diagonal kind written by a user."""

    kind_name = "leaky_test"


class LeakyKind(ElementwiseKind):
    layer = Leaky

    def param_shapes(self, cell, F):
        return {"weight_ih": (cell.hidden_size, F), "alpha": (cell.hidden_size,)}

    def reset(self, module, p):
        p["weight_ih"].normal_(0, 1 / math.sqrt(p["weight_ih"].shape[1]))
        p["alpha"].uniform_(0, 4)

    def project(self, p, x):
        return torch.tanh(x @ p["weight_ih"].T)

    def recur(self, p, P, h):
        return torch.sigmoid(p["alpha"]) * h + P

    def diag(self, p, P, prev):
        return {"d": torch.sigmoid(p["alpha"]).expand_as(prev)}


LEAKY = LeakyKind()


@pytest.fixture
def leaky():
    kinds.register_kind(kinds.CellKind("leaky_test", "leaky diagonal RNN (test)", f"{__name__}:LEAKY",
                                       structure="diagonal"))
    try:
        yield kinds.get("leaky_test")
    finally:
        kinds.unregister_kind("leaky_test")
    assert "leaky_test" not in kinds.zoo()


def test_a_registered_kind_goes_through_zoo_recording_and_analysis(leaky):
    """Registered like the built-in kinds, a user's kind is in the zoo, is recorded through its kernel
    (δ_t against retain_grad of its own plain forward) and gets exact Lyapunov exponents ln σ(α)."""
    task = gradflow.tasks.get_task("adding", T=7)
    m = gradflow.models.model_for_task(task, "leaky_test", hidden=3, seed=0).double()
    b = task.sample(2, seed=0)
    x, y = b.x.double(), b.y.double()
    with gradflow.record(m, keep="states") as rec:
        task.loss(m(x), y).backward()
    tr = rec.trace
    key = tr.keys()[0]
    p = dict(m.rnn.named_parameters())
    h, hs = torch.zeros(2, 3, dtype=torch.float64), []
    for t in range(7):
        h = torch.sigmoid(p["alpha_l0"]) * h + torch.tanh(x[t] @ p["weight_ih_l0"].T)
        h.retain_grad()
        hs.append(h)
    task.loss(m.head(h), y).backward()
    torch.testing.assert_close(tr.grad(key), torch.stack([s.grad for s in hs]), rtol=1e-10, atol=1e-14)
    want = torch.log(torch.sigmoid(p["alpha_l0"].detach())).sort(descending=True).values
    torch.testing.assert_close(gradflow.lyapunov_spectrum(tr, key).exponents, want.expand(2, 3), atol=1e-14, rtol=0)
