"""HardClusterMemory (cluster-contrast ``CM_Hard``): one step's gradient and memory update, computed independently."""

import numpy as np
import torch

from partreid.pplr_finetune.cluster_memory import HardClusterMemory


def _numpy_step(f, y, m0, temp, momentum):
    """Loss, dLoss/df and the updated memory with numpy only (finite formulas, no autograd)."""
    norm = np.linalg.norm(f, axis=1, keepdims=True)
    u = f / norm
    logits = u @ m0.T / temp
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    b = len(y)
    loss = -np.log(p[np.arange(b), y]).mean()
    onehot = np.eye(m0.shape[0])[y]
    g_u = (p - onehot) @ m0 / temp / b                      # gradient w.r.t. the normalised features
    g_f = (g_u - (g_u * u).sum(axis=1, keepdims=True) * u) / norm   # through f / |f|
    mem = m0.copy()
    for c in sorted(set(y.tolist())):
        rows = [i for i in range(b) if y[i] == c]
        sims = [float(u[i] @ m0[c]) for i in rows]
        hard = rows[int(np.argmin(sims))]
        v = momentum * mem[c] + (1 - momentum) * u[hard]
        mem[c] = v / np.linalg.norm(v)
    return loss, g_f, mem


def test_one_step_gradient_and_update_match_an_independent_computation():
    rng = np.random.default_rng(0)
    c0 = rng.normal(size=(5, 8))
    m0 = c0 / np.linalg.norm(c0, axis=1, keepdims=True)
    f = rng.normal(size=(10, 8))
    y = np.array([0, 0, 1, 1, 1, 2, 3, 3, 4, 4])
    loss_ref, grad_ref, mem_ref = _numpy_step(f, y, m0, 0.05, 0.2)

    mem = HardClusterMemory(torch.tensor(c0, dtype=torch.float64), temperature=0.05, momentum=0.2)
    mem.memory = torch.tensor(m0)  # float64 memory for a tight comparison
    ft = torch.tensor(f, requires_grad=True)
    loss = mem(ft, torch.tensor(y))
    # the memory is untouched until the backward pass
    np.testing.assert_allclose(mem.memory.numpy(), m0, atol=1e-12)
    loss.backward()
    np.testing.assert_allclose(float(loss.detach()), loss_ref, rtol=1e-10)
    np.testing.assert_allclose(ft.grad.numpy(), grad_ref, rtol=1e-8, atol=1e-12)  # against the PRE-update M
    np.testing.assert_allclose(mem.memory.numpy(), mem_ref, atol=1e-12)
    assert not np.allclose(mem_ref, m0)


def test_float32_step_in_a_model_and_no_update_without_backward():
    torch.manual_seed(0)
    mem = HardClusterMemory(torch.randn(5, 8))
    lin = torch.nn.Linear(8, 8)
    x, y = torch.randn(10, 8), torch.randint(0, 5, (10,))
    before = mem.memory.clone()
    with torch.no_grad():
        mem(lin(x), y)
    assert torch.equal(mem.memory, before)
    mem(lin(x), y).backward()  # the reproducer: must not raise "modified by an inplace operation"
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()
    assert not torch.equal(mem.memory, before)
    np.testing.assert_allclose(mem.memory.norm(dim=1).numpy(), 1.0, atol=1e-6)
