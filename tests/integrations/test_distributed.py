"""gather_trace under DDP: 2 processes, gloo on CPU. The gathered δ_t equal one process on the full
batch, and recording leaves DDP's parameter gradients unchanged."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

import gradflow
from gradflow.distributed import gather_trace, strip_module_prefix
from gradflow.errors import GradflowError

from . import _ddp_worker as W


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(W.worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("kind", ["lstm", "gru", "packed"])
def test_gathered_trace_equals_single_process(ddp_out, kind):
    s = W.SETTINGS[kind]
    model = W.build(kind)
    x = W.data(kind, sum(s["sizes"]))
    total = sum(s["sizes"])
    with gradflow.record(model, keep=s["keep"]) as rec:
        W.loss_fn(kind, W.run(kind, model, x, 0, total)).backward()
    ref = rec.trace
    got = gradflow.Trace.load(ddp_out / kind)
    assert got.keys() == ref.keys()  # "module." stripped: keys as for the unwrapped model
    assert got.meta["shard_sizes"] == list(s["sizes"]) and got.meta["world_size"] == 2
    for k in ref.keys():
        assert got.shape(k) == (W.T, total)
        # packed: rank 1's shard is shorter (T_r = 4) and is padded with masked steps (NaN)
        torch.testing.assert_close(got.grad(k), ref.grad(k), atol=1e-6, rtol=0, equal_nan=True)
        torch.testing.assert_close(got.norm(k), ref.norm(k), atol=1e-6, rtol=0, equal_nan=True)
        assert torch.equal(got.mask(k), ref.mask(k))
        if s["keep"] == "states":
            torch.testing.assert_close(got.states(k), ref.states(k), atol=1e-6, rtol=0)
            torch.testing.assert_close(got.prev_states(k), ref.prev_states(k), atol=1e-6, rtol=0)
            torch.testing.assert_close(got.inputs(k), ref.inputs(k), atol=1e-6, rtol=0)
    # parameter gradients: recording changes nothing; DDP averages a summed loss over 2 ranks
    model.zero_grad(set_to_none=True)
    W.loss_fn(kind, W.run(kind, model, x, 0, total)).backward()
    single = [p.grad for p in model.parameters()]
    z = np.load(ddp_out / f"{kind}_grads.npz")
    for i, g in enumerate(single):
        np.testing.assert_allclose(z[f"rec_{i}"], z[f"plain_{i}"], atol=1e-12, rtol=0)
        np.testing.assert_allclose(2 * z[f"plain_{i}"], g.numpy(), atol=1e-10, rtol=0)


def test_single_process_and_prefix():
    ddp_like = torch.nn.Module()
    ddp_like.module = W.build("gru")
    x = W.data("gru", 2)
    with gradflow.record(ddp_like, keep="norms") as rec:
        W.loss_fn("gru", ddp_like.module(x)).backward()
    assert {k.module for k in rec.trace.keys()} == {"module.rnn"}
    got = gather_trace(rec.trace)  # torch.distributed not initialised: the trace itself, prefix stripped
    assert {k.module for k in got.keys()} == {"rnn"}
    assert {k.module for k in gather_trace(rec.trace, strip_prefix=None).keys()} == {"module.rnn"}
    root = torch.nn.Module()
    root.module = torch.nn.RNN(3, 4)
    with gradflow.record(root) as rec:
        root.module(torch.randn(5, 2, 3))[0].sum().backward()
    assert strip_module_prefix(rec.trace).keys()[0].module == ""
    with pytest.raises(GradflowError, match="Trace"):
        gather_trace({"not": "a trace"})
