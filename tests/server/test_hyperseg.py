"""HyperSeg: the hypernetwork on its own, and the whole workflow in FLARE's simulator on the tiny phantom."""

from __future__ import annotations

import pytest
import torch
from brats_fl.server.hyperseg import HyperNetwork


def test_hypernetwork_starts_at_the_initial_weights_and_learns_its_embedding():
    initial = {"conv.weight": torch.randn(3, 8, 3, 3, 3), "conv.bias": torch.randn(3)}
    net = HyperNetwork(initial, sites=4, descriptor="embedding", embedding_dim=10, depth=20, width=100)
    out = [net(i) for i in range(4)]
    for key, value in initial.items():
        assert out[0][key].shape == value.shape
        torch.testing.assert_close(out[0][key], value, atol=0.05, rtol=0)  # near the initial model ...
    assert not torch.equal(out[0]["conv.weight"], out[1]["conv.weight"])  # ... but a different model per site
    # a deep stack still passes the descriptor through: the embedding gets a gradient
    sum(o["conv.weight"].square().sum() for o in out).backward()
    assert net.embedding.grad is not None and net.embedding.grad.abs().sum() > 0


def test_hypernetwork_refuses_an_unknown_descriptor():
    with pytest.raises(ValueError, match="descriptor"):
        HyperNetwork({"w": torch.zeros(2)}, sites=2, descriptor="name")
