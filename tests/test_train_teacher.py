"""The cached teacher's loss: the KL of the top-k coarsened distributions, checked against the full KL."""

from __future__ import annotations

import pytest
import torch

from hedgerow.server.embedded.train.teacher import cached_batches, greedy_pool, make_topk_kd_loss_fn, topk_of
from hedgerow.server.errors import HedgerowError


class _Logits(torch.nn.Module):
    """A 'model' whose logits are fixed parameters [B, L, V], whatever the input ids."""

    def __init__(self, logits):
        super().__init__()
        self.w = torch.nn.Parameter(logits.clone())

    def forward(self, input_ids):
        return type("Out", (), {"logits": self.w})()


def _full_kl(t_logits, s_logits, mask):
    t, s = t_logits.log_softmax(-1), s_logits.log_softmax(-1)
    per = (t.exp() * (t - s)).sum(-1)
    return (per * mask).sum() / mask.sum()


def _part(t_logits, k, mask):
    logp, idx = topk_of(t_logits, k)
    y = t_logits.argmax(-1)
    return (y, y, idx.long(), logp.float(), mask)


@pytest.mark.unit
@pytest.mark.parametrize("k", [2, 7, 16])
def test_topk_kl_is_the_kl_of_the_coarsened_distributions(k):
    g = torch.Generator().manual_seed(k)
    V = 16
    t_logits = torch.randn(2, 5, V, generator=g) * 2
    s_logits = torch.randn(2, 5, V, generator=g) * 2
    mask = torch.rand(2, 5, generator=g) > 0.3
    fn = make_topk_kd_loss_fn(alpha=1.0)
    loss = fn(_Logits(s_logits), [_part(t_logits, k, mask)])[0].detach()
    full = _full_kl(t_logits, s_logits, mask.float())
    # the reference: both distributions with every token outside the teacher's top-k merged into one
    t, s = t_logits.softmax(-1), s_logits.softmax(-1)
    idx = t.topk(k, -1).indices
    t_top, s_top = t.gather(-1, idx), s.gather(-1, idx)
    t_c = torch.cat([t_top, 1 - t_top.sum(-1, keepdim=True)], -1).clamp_min(1e-30)
    s_c = torch.cat([s_top, 1 - s_top.sum(-1, keepdim=True)], -1).clamp_min(1e-30)
    coarse = ((t_c * (t_c.log() - s_c.log())).sum(-1) * mask).sum() / mask.sum()
    assert float(loss) == pytest.approx(float(coarse), rel=2e-3, abs=2e-3)  # float16 teacher values
    if k == V:
        assert float(loss) == pytest.approx(float(full), rel=2e-3, abs=2e-3)
    else:
        assert 0.0 < float(loss) <= float(full) + 1e-3


@pytest.mark.unit
def test_topk_kl_is_zero_at_the_teacher_and_its_gradient_points_there():
    g = torch.Generator().manual_seed(0)
    t_logits = torch.randn(1, 4, 12, generator=g)
    mask = torch.ones(1, 4, dtype=torch.bool)
    fn = make_topk_kd_loss_fn(alpha=1.0)
    loss, metrics = fn(_Logits(t_logits), [_part(t_logits, 5, mask)])
    loss = loss.detach()
    assert abs(float(loss)) < 2e-3 and float(metrics["top1_agree"]) == 1.0
    model = _Logits(torch.zeros(1, 4, 12))
    opt = torch.optim.SGD(model.parameters(), lr=2.0)
    first = None
    for _ in range(200):
        loss, _ = fn(model, [_part(t_logits, 5, mask)])
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.05 * first
    assert torch.equal(model.w.argmax(-1), t_logits.argmax(-1))


@pytest.mark.unit
def test_cached_batches_mix_the_pools_and_are_drawn_from_the_step(tmp_path):
    args = type("A", (), {"seed": 3, "greedy_fraction": 0.5})()
    k = 4
    wx = torch.arange(40, dtype=torch.int32).reshape(5, 8)
    windows = {"x": wx, "y": wx + 1, "idx": torch.zeros(5, 8, k, dtype=torch.int16),
               "logp": torch.zeros(5, 8, k, dtype=torch.float16)}
    rows = torch.arange(100, 133, dtype=torch.int32).reshape(3, 11)  # prefix 5 + 6 generated
    gp = greedy_pool(rows, torch.ones(3, 6, k, dtype=torch.int16), torch.zeros(3, 6, k, dtype=torch.float16), 5)
    assert gp["mask"].tolist() == [[False] * 4 + [True] * 6] * 3
    assert torch.equal(gp["x"][:, 1:], gp["y"][:, :-1])
    parts = cached_batches(windows, gp, "draft", 4, args)(7)
    assert [tuple(p[0].shape) for p in parts] == [(2, 8), (2, 10)]
    assert parts[0][4].all() and not parts[1][4][:, :4].any()
    again = cached_batches(windows, gp, "draft", 4, args)(7)
    assert all(torch.equal(a, b) for pa, pb in zip(parts, again) for a, b in zip(pa, pb))
    only_greedy = cached_batches(None, gp, "draft", 4, args)(0)
    assert [tuple(p[0].shape) for p in only_greedy] == [(4, 10)]
    with pytest.raises(HedgerowError, match="no rows"):
        cached_batches(None, None, "draft", 4, args)
