"""Recording never makes a result silently wrong and differs from plain torch only where it must (issue 12,
items 2, 9, 10): double backward through a recorded fused module raises every time, copying/saving a
recorded model gives a plain model, empty batches and meta tensors behave as in torch, and the calls of a
cell are its separate loops."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import io
import pickle
import weakref

import pytest
import torch
from torch import nn

import gradflow
from gradflow.errors import GradflowError, UnsupportedModuleError
from gradflow.trace import StateKey
from tests.recording.test_cells import Probes
from tests.recording.test_fused import KINDS, Case, build
from tests.recording.test_lifecycle import assert_clean, global_hooks, snapshot


# ---------------------------------------------------------------------- item 2: double backward
def _penalty_grads(m, x, loss_kind, how):
    """A gradient-penalty step: L + Σ_p ||dL/dp||², its parameter gradients left in .grad."""
    out = m(x)[0]
    scale = torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)
    loss = out.sum() if loss_kind == "constant" else (out * scale).pow(2).sum()
    params = [p for p in m.parameters()]
    if how == "grad":
        gs = torch.autograd.grad(loss, params, create_graph=True)
        (loss + sum(g.pow(2).sum() for g in gs)).backward()
    else:
        loss.backward(create_graph=True)
        pen = sum(p.grad.pow(2).sum() for p in params)
        for p in params:  # keep d(L + pen)/dp from both terms: the first-order grad is in .grad already
            p.grad = p.grad.detach()
        pen.backward()


class CellLoop(nn.Module):
    """An nn.*Cell run over the sequence in a Python loop (ordinary autograd: double backward works)."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def forward(self, x):
        s, outs = None, []
        for t in range(x.shape[0]):
            s = self.cell(x[t], s)
            outs.append(s[0] if isinstance(s, tuple) else s)
        return torch.stack(outs), s


FUSED = [Case(kind=k) for k in KINDS] + [Case(kind="lstm", layers=2, bidirectional=True)]
CELLS = {"lstmcell": lambda: nn.LSTMCell(3, 4), "grucell": lambda: nn.GRUCell(3, 4),
         "rnncell": lambda: nn.RNNCell(3, 4)}


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("how", ["grad", "backward"])
@pytest.mark.parametrize("loss_kind", ["constant", "general"])
@pytest.mark.parametrize("case", FUSED, ids=lambda c: f"{c.kind}-L{c.layers}{'-bi' if c.bidirectional else ''}")
def test_double_backward_through_fused_module_raises_every_time(case, loss_kind, how):
    """The penalty term would be dropped (constant dL/d out) or fail later with torch's message: instead the
    first create_graph backward through the recording kernel raises one GradflowError naming create_graph,
    and leaves no parameter gradient in the recorded module."""
    m = build(case)
    x = torch.randn(case.T, case.B, case.F, dtype=case.dtype)
    with gradflow.record(m, keep="full") as rec:
        with pytest.raises(UnsupportedModuleError, match=r"module '<root>'.*create_graph=True") as err:
            _penalty_grads(m, x, loss_kind, how)
        assert "\n" not in str(err.value)
        assert all(p.grad is None for p in m.parameters())
        # the recorder goes on recording ordinary backward passes
        out = m(x)[0]
        out.pow(2).sum().backward()
        assert rec.trace.shape(StateKey("", state="h")) == (case.T, case.B)
    # outside record() the module is plain torch again: double backward works where torch supports it
    if case.kind in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
        m.zero_grad()
        _penalty_grads(m, x, loss_kind, how)
        assert all(p.grad is not None for p in m.parameters())


def test_double_backward_after_exit_of_a_graph_built_inside_raises():
    """The graph built inside record() holds the recording kernel after exit too: still no silent drop."""
    m = build(Case(kind="lstm"))
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    with gradflow.record(m):
        out = m(x)[0]
    with pytest.raises(UnsupportedModuleError, match="create_graph=True"):
        torch.autograd.grad(out.sum(), list(m.parameters()), create_graph=True)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_double_backward_message_names_the_module_path():
    m = nn.Sequential(nn.Linear(3, 3), nn.GRU(3, 4)).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with gradflow.record(m):
        out = m(x)[0]
        with pytest.raises(UnsupportedModuleError, match=r"module '1'.*create_graph=True"):
            out.sum().backward(create_graph=True)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("how", ["grad", "backward"])
@pytest.mark.parametrize("loss_kind", ["constant", "general"])
@pytest.mark.parametrize("name", sorted(CELLS))
def test_double_backward_through_recorded_cells_is_exact(name, loss_kind, how):
    """Cells run torch's own autograd: the gradient penalty's parameter gradients equal the plain model's."""
    torch.manual_seed(0)
    m = CellLoop(CELLS[name]()).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    _penalty_grads(m, x, loss_kind, how)
    plain = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    with gradflow.record(m):
        _penalty_grads(m, x, loss_kind, how)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], rtol=1e-12, atol=1e-12, msg=n)


# ---------------------------------------------------------------------- item 9: like plain torch
class Mixed(nn.Module):
    """A fused bidirectional LSTM feeding a GRUCell loop and a head (fused and cell adapters at once)."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
        self.cell = nn.GRUCell(8, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        out, _ = self.lstm(x)
        h = None
        for t in range(out.shape[0]):
            h = self.cell(out[t], h)
        return self.head(h)


def assert_plain(model, before):
    """Nothing of gradflow left: no hook, no instance forward, no instance __getstate__."""
    assert_clean(model, before)
    for name, mod in model.named_modules():
        assert "__getstate__" not in mod.__dict__, name


def _mixed():
    torch.manual_seed(0)
    return Mixed().double(), torch.randn(5, 2, 3, dtype=torch.float64)


@pytest.mark.parametrize("failure", [False, True])
def test_deepcopy_inside_record_is_a_plain_independent_model(failure):
    """The copy runs torch's own forward on its own parameters (not the recorded original's), is not
    recorded, and neither the copy nor the original keeps anything of gradflow after exit."""
    m, x = _mixed()
    before, g0 = snapshot(m), global_hooks()
    plain = copy.deepcopy(m)

    class Boom(Exception):
        pass

    copies = []
    with pytest.raises(Boom) if failure else contextlib.nullcontext():
        with gradflow.record(m, keep="full") as rec:
            c = copy.deepcopy(m)
            copies.append(c)
            assert_clean(c, before)
            with torch.no_grad():  # the copy's parameters are its own
                c.head.bias.add_(1.0)
                plain.head.bias.add_(1.0)
            y, ref = c(x), plain(x)
            torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
            y.pow(2).sum().backward()
            ref.pow(2).sum().backward()
            for (n, p), q in zip(c.named_parameters(), plain.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=n)
            assert all(p.grad is None for p in m.parameters())
            assert rec.traces == []
            if failure:
                raise Boom
            m(x).sum().backward()  # the original is still recorded
            assert len(rec.trace.keys()) == 2 * 2 * 2 + 1
    assert_plain(m, before)
    assert_plain(copies[0], before)
    assert global_hooks() == g0


def test_torch_save_and_pickle_inside_record_give_the_plain_model():
    m, x = _mixed()
    before = snapshot(m)
    with gradflow.record(m) as rec:
        buf = io.BytesIO()
        torch.save(m, buf)
        data = pickle.dumps(m)
        m(x).sum().backward()
        assert len(rec.traces) == 1
    assert buf.getbuffer().nbytes > 0
    loaded = pickle.loads(data)
    assert_plain(loaded, before)
    assert_plain(m, before)
    torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)
    torch.save(m, io.BytesIO())


def _outcome(fn):
    try:
        return "ok", fn()
    except Exception as exc:  # noqa: BLE001 - the outcome is compared with plain torch's
        return type(exc), str(exc)


def _run_module(m, x):
    out = m(x)
    leaves = torch.utils._pytree.tree_leaves(out)
    sum(t.sum() for t in leaves if isinstance(t, torch.Tensor)).backward()
    return [t.detach() for t in leaves] + [p.grad for p in m.parameters()]


EMPTY = [
    *(dict(kind=k, shape=(5, 0, 3)) for k in KINDS),
    *(dict(kind=k, shape=(0, 2, 3)) for k in ("lstm", "mingru")),
    dict(kind="gru", shape=(0, 5, 3), batch_first=True),
    dict(kind="lstm", shape=(5, 0, 3), layers=2, bidirectional=True),
]


@pytest.mark.parametrize("spec", EMPTY, ids=lambda s: f"{s['kind']}-{'x'.join(map(str, s['shape']))}")
def test_empty_batch_and_empty_sequence_behave_as_the_plain_module(spec):
    spec = dict(spec)
    shape = spec.pop("shape")
    m = build(Case(**spec))
    x = torch.randn(*shape, dtype=torch.float64)
    plain = _outcome(lambda: _run_module(m, x))
    m.zero_grad(set_to_none=True)
    with gradflow.record(m) as rec:
        recorded = _outcome(lambda: _run_module(m, x))
    assert recorded[0] == plain[0], (recorded, plain)
    if plain[0] == "ok":
        for a, b in zip(recorded[1], plain[1]):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert rec.traces == []
    else:
        assert recorded[1] == plain[1]


@pytest.mark.parametrize("name", sorted(CELLS))
def test_empty_batch_cell_loop_behaves_as_torch(name):
    torch.manual_seed(0)
    m = CellLoop(CELLS[name]()).double()
    x = torch.randn(4, 0, 3, dtype=torch.float64)
    plain = _run_module(m, x)
    m.zero_grad(set_to_none=True)
    with gradflow.record(m) as rec:
        recorded = _run_module(m, x)
    for a, b in zip(recorded, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert rec.traces == []


@pytest.mark.parametrize("what", ["lstm", "gru", "mingru", "lru", "lstmcell", "mixed"])
def test_meta_device_behaves_as_torch(what):
    """Meta tensors have shapes and no values: forward and backward run as in torch, nothing is recorded."""
    if what in CELLS:
        m = CellLoop(CELLS[what]())
    elif what == "mixed":
        m = _mixed()[0]
    else:
        m = build(Case(kind=what))
    m = m.to("meta")
    x = torch.randn(5, 2, 3, dtype=next(m.parameters()).dtype, device="meta")
    plain = _outcome(lambda: _run_module(m, x))
    m.zero_grad(set_to_none=True)
    before = snapshot(m)
    with gradflow.record(m) as rec:
        recorded = _outcome(lambda: _run_module(m, x))
    assert plain[0] == "ok" and recorded[0] == "ok", (plain, recorded)
    for a, b in zip(recorded[1], plain[1]):
        assert a.is_meta and a.shape == b.shape and a.dtype == b.dtype
    assert rec.traces == []
    assert_clean(m, before)


@pytest.mark.parametrize("bad", [42, 3.5, None.__class__, [42], ["lstm", 7], b"lstm"])
def test_bad_modules_option_is_a_gradflow_error_naming_it(bad):
    m, _ = _mixed()
    with pytest.raises(GradflowError, match=r"record\(modules=") as err:
        gradflow.record(m, modules=bad)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bad", [5, "print"])
def test_bad_callback_is_refused_before_any_backward(bad):
    m, _ = _mixed()
    with pytest.raises(GradflowError, match=r"record\(callback="):
        gradflow.record(m, callback=bad)


def test_a_failed_attach_leaves_the_model_plain_and_the_outer_recorder_working():
    """A second record() of the same model fails on entry (the LSTM already has gradflow's forward): the
    failed recorder takes back what it attached to the GRUCell, the outer one keeps recording and
    copying, and after exit the model is plain."""
    m, x = _mixed()
    before = snapshot(m)
    with gradflow.record(m) as outer:
        with pytest.raises(UnsupportedModuleError, match="already has an instance forward"):
            with gradflow.record(m, modules=["cell", "lstm"]):
                pass
        c = copy.deepcopy(m)
        assert_plain(c, before)
        m(x).sum().backward()
        assert len(outer.trace.keys()) == 9
    assert_plain(m, before)


# ---------------------------------------------------------------------- item 10: cell loops are calls
@dataclasses.dataclass(frozen=True)
class LoopCase:
    """Loops over one cell in one backward pass: ``loops`` is a list of (T, B); ``interleave`` runs them
    in lockstep; ``between`` transforms the state between steps (it stays one loop); ``shrink`` gives
    the batch size of each step of one loop (a smaller batch continues from h[:b])."""

    name: str
    kind: str = "lstm"
    loops: tuple = ((3, 2), (5, 2))
    interleave: bool = False
    between: str = ""
    shrink: tuple = ()


def _cell(kind):
    torch.manual_seed(0)
    return {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}[kind](3, 4).double()


class Loops(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.cell = _cell(kind)

    def step(self, x, s, probe, name, t):
        s = self.cell(x, s)
        tup = s if isinstance(s, tuple) else (s,)
        if probe is not None:
            tup = probe(name, t, tup)
        return tup if self.kind == "lstm" else tup[0]

    def forward(self, case: LoopCase, xs, ws, probe=None):
        """Σ over loops and steps of <w, h_t>; loop i is probed as 'loop{i}' (segment j of a shrinking loop
        as 'seg{j}')."""
        loss = 0.0
        h = lambda s: s[0] if isinstance(s, tuple) else s  # noqa: E731
        if case.shrink:
            x, w = xs[0], ws[0]
            s, seg, t0, b_prev = None, -1, 0, None
            for t, b in enumerate(case.shrink):
                if b != b_prev:
                    seg, t0, b_prev = seg + 1, t, b
                    if s is not None:
                        s = tuple(v[:b] for v in s) if isinstance(s, tuple) else s[:b]
                s = self.step(x[t, :b], s, probe, f"seg{seg}", t - t0)
                loss = loss + (w[t, :b] * h(s)).sum()
            return loss
        states = [None] * len(xs)
        order = ([(t, i) for t in range(max(x.shape[0] for x in xs)) for i in range(len(xs)) if t < xs[i].shape[0]]
                 if case.interleave else [(t, i) for i in range(len(xs)) for t in range(xs[i].shape[0])])
        for t, i in order:
            s = self.step(xs[i][t], states[i], probe, f"loop{i}", t)
            loss = loss + (ws[i][t] * h(s)).sum()
            if case.between == "scale":
                s = tuple(0.9 * v for v in s) if isinstance(s, tuple) else 0.9 * s
            elif case.between == "clone":
                s = tuple(v.clone() for v in s) if isinstance(s, tuple) else s.clone()
            states[i] = s
        return loss


LOOPS = [
    LoopCase("two-loops-lstm"),
    LoopCase("two-loops-gru", kind="gru", loops=((4, 2), (2, 2))),
    LoopCase("batch-sizes", loops=((3, 2), (4, 3))),
    LoopCase("three-loops-rnn", kind="rnn", loops=((2, 1), (3, 4), (2, 2))),
    LoopCase("interleaved", loops=((4, 2), (3, 3)), interleave=True),
    LoopCase("state-scaled-between-steps", loops=((4, 2),), between="scale"),
    LoopCase("state-cloned-between-steps", kind="gru", loops=((3, 2), (2, 2)), between="clone"),
    LoopCase("batch-shrinks", loops=((5, 3),), shrink=(3, 3, 2, 2, 1)),
]


def _data(case):
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(T, B, 3, generator=g, dtype=torch.float64) for T, B in case.loops]
    ws = [torch.randn(T, B, 4, generator=g, dtype=torch.float64) for T, B in case.loops]
    return xs, ws


@pytest.mark.parametrize("case", LOOPS, ids=lambda c: c.name)
def test_each_cell_loop_is_its_own_call(case):
    """Call i of the cell is loop i (or fixed-batch segment i), with its own T and B, equal to the probe
    reference; nothing raises inside backward."""
    m = Loops(case.kind)
    xs, ws = _data(case)
    pr = Probes()
    ref = pr.grads(m(case, xs, ws, probe=pr))
    with gradflow.record(m, keep="full") as rec:
        m(case, xs, ws).backward()
    states = ("h", "c") if case.kind == "lstm" else ("h",)
    names = sorted({p for p, _ in ref}, key=lambda p: int(p[4:] if p.startswith("loop") else p[3:]))
    assert rec.trace.keys() == [StateKey("cell", state=s, call=i) for i in range(len(names)) for s in states]
    for i, name in enumerate(names):
        for s in states:
            key = StateKey("cell", state=s, call=i)
            torch.testing.assert_close(rec.trace.grad(key), ref[(name, s)], rtol=1e-10, atol=1e-12, msg=str(key))


def test_unused_forward_leaves_nothing_behind():
    """A grad-enabled loop never backpropagated is not part of the next backward's trace (and not kept alive)."""
    case = LoopCase("one", loops=((4, 2),))
    m = Loops("lstm")
    xs, ws = _data(case)
    with gradflow.record(m, keep="full") as rec:
        unused = m(case, [torch.randn(6, 2, 3, dtype=torch.float64)], [torch.randn(6, 2, 4, dtype=torch.float64)])
        probe = weakref.ref(unused)
        del unused
        gc.collect()
        assert probe() is None
        m(case, xs, ws).backward()
        trace = rec.trace
    pr = Probes()
    ref = pr.grads(m(case, xs, ws, probe=pr))
    assert trace.keys() == [StateKey("cell", state="h"), StateKey("cell", state="c")]
    torch.testing.assert_close(trace.grad(StateKey("cell", state="h")), ref[("loop0", "h")], rtol=1e-10, atol=1e-12)


def test_steps_of_a_reached_loop_after_its_last_loss_term_are_zero():
    """The loop's later steps do not reach the loss: they are part of the call, with zero gradient."""
    cell = _cell("gru")
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with gradflow.record(cell, keep="full") as rec:
        h, hs = None, []
        for t in range(5):
            h = cell(x[t], h)
            hs.append(h)
        hs[2].sum().backward()
    g = rec.trace.grad(StateKey("", state="h"))
    assert g.shape == (5, 2, 4)
    assert torch.all(g[3:] == 0) and torch.all(g[2] == 1) and torch.all(g[:2] != 0)


def test_error_mid_loop_leaves_the_model_plain_and_a_new_recorder_starts_its_own_loops():
    """Loop tags live on the autograd nodes, not in hooks: a loop left by a recorder that exited on an error
    does not continue in the next recorder, and nothing of the first is left on the model."""
    m = Loops("lstm")
    before = snapshot(m)
    x = torch.randn(4, 2, 3, dtype=torch.float64)

    class Boom(Exception):
        pass

    s = None
    with pytest.raises(Boom):
        with gradflow.record(m):
            for t in range(2):
                s = m.cell(x[t], s)
            raise Boom
    assert_plain(m, before)
    with gradflow.record(m, keep="full") as rec:
        s2 = s
        for t in range(2, 4):
            s2 = m.cell(x[t], s2)
        s2[0].sum().backward()
    assert rec.trace.keys() == [StateKey("cell", state="h"), StateKey("cell", state="c")]
    assert rec.trace.shape(StateKey("cell", state="h")) == (2, 2)
    assert_plain(m, before)
