"""The gate's semantics: what is kept, and why the WINA score is the right one when columns are orthogonal."""
from __future__ import annotations

import torch

from wina_cli.sparse import Gate, GatedLinear, Segment, column_norms


def test_threshold_keeps_scores_strictly_above():
    x = torch.tensor([[0.1, -2.0, 0.5, -0.3]])
    keep = Gate("teal", "threshold", threshold=0.4).mask(x)
    assert keep.tolist() == [[False, True, True, False]]


def test_wina_scales_scores_by_column_norm():
    x = torch.tensor([[1.0, 1.0, 1.0]])
    keep = Gate("wina", "threshold", threshold=1.5, scale=torch.tensor([1.0, 2.0, 3.0])).mask(x)
    assert keep.tolist() == [[False, True, True]]


def test_topk_keeps_exactly_k_per_token():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 40, generator=g)
    keep = Gate("wina", "topk", k=13, scale=torch.rand(40, generator=g) + 0.1).mask(x)
    assert (keep.sum(-1) == 13).all()


def test_dropping_a_channel_changes_output_by_its_wina_score_for_orthogonal_columns():
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    w = q[:, :16] * torch.linspace(0.5, 3.0, 16, dtype=torch.float64)  # orthogonal columns, distinct norms
    x = torch.randn(16, generator=g, dtype=torch.float64)
    norms = w.norm(dim=0)
    for i in range(16):
        xm = x.clone(); xm[i] = 0
        assert torch.isclose((w @ x - w @ xm).norm(), x[i].abs() * norms[i])


def test_gated_linear_without_gates_is_the_linear_and_fused_segments_gate_separately():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 6, bias=True)
    x = torch.randn(2, 8)
    ref = lin(x)
    segs = [Segment("a", (0, 4)), Segment("b", (4, 6))]
    GatedLinear.wrap(lin, segs)
    assert torch.equal(lin(x), ref)
    segs[1].gate = Gate("teal", "topk", k=0)  # segment b reads no channel: only its bias remains
    y = lin(x)
    assert torch.allclose(y[:, :4], ref[:, :4])
    assert torch.allclose(y[:, 4:], lin.bias[4:].expand(2, 2))


def test_counters_measure_realized_sparsity():
    lin = torch.nn.Linear(10, 3, bias=False)
    seg = Segment("a", None, gate=Gate("teal", "topk", k=3))
    GatedLinear.wrap(lin, [seg])
    lin.counting = True
    lin(torch.randn(4, 10))
    assert seg.counter.total == 40 and seg.counter.kept == 12
    assert abs(seg.counter.sparsity - 0.7) < 1e-9


def test_column_norms():
    w = torch.tensor([[3.0, 0.0], [4.0, 1.0]])
    assert column_norms(w).tolist() == [5.0, 1.0]
