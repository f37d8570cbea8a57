"""VITask losses against values computed by hand on 3-token vocabularies."""
import math

import pytest
import torch

from xtuner_vitask.models import losses

LN = math.log


def logits_of(*probs):
    return torch.tensor([[LN(p) for p in row] for row in probs])


def test_response_rows_shift_and_mask():
    logits = torch.arange(2 * 4 * 3, dtype=torch.float).reshape(2, 4, 3)
    labels = torch.tensor([[-100, -100, 2, 1], [-100, 0, -100, -100]])
    rows, targets = losses.response_rows(logits, labels)
    assert targets.tolist() == [2, 1, 0]
    # token at t is predicted by position t-1
    assert torch.equal(rows, torch.stack([logits[0, 1], logits[0, 2], logits[1, 0]]))


def test_vanilla_and_ep_loss_eq1_eq2():
    logits = logits_of([0.25, 0.5, 0.25], [1 / 3, 1 / 3, 1 / 3])
    targets = torch.tensor([1, 0])
    expected = (LN(2) + LN(3)) / 2  # mean over response tokens of -log p
    assert losses.vanilla_loss(logits, targets).item() == pytest.approx(expected, rel=1e-6)
    assert losses.exemplar_prompting_loss(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def test_rda_eq3_is_kl_plain_to_exemplar():
    plain = logits_of([0.5, 0.25, 0.25])
    ep = logits_of([0.25, 0.5, 0.25])
    # KL(P||Q) = 0.5 ln(0.5/0.25) + 0.25 ln(0.25/0.5) + 0.25 ln 1
    expected = 0.5 * LN(2) - 0.25 * LN(2)
    got = losses.response_distribution_alignment_loss(plain, ep)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # direction matters: the plain model's distribution is the first argument of the KL
    p, q = [0.7, 0.2, 0.1], [0.2, 0.4, 0.4]
    kl_pq = sum(a * LN(a / b) for a, b in zip(p, q))
    kl_qp = sum(b * LN(b / a) for a, b in zip(p, q))
    assert kl_pq != pytest.approx(kl_qp, rel=1e-2)
    got = losses.response_distribution_alignment_loss(logits_of(p), logits_of(q))
    assert got.item() == pytest.approx(kl_pq, rel=1e-6)
    assert losses.response_distribution_alignment_loss(plain, plain).item() == pytest.approx(0.0, abs=1e-7)


def test_rda_forward_direction_swaps_the_sides_and_keeps_the_teacher_detached():
    """kl='forward' (a diagnostic, not eq. 3): KL(EP || plain); an unknown direction is refused."""
    p, q = [0.7, 0.2, 0.1], [0.2, 0.4, 0.4]
    kl_qp = sum(b * LN(b / a) for a, b in zip(p, q))
    plain, ep = logits_of(p).requires_grad_(), logits_of(q).requires_grad_()
    got = losses.response_distribution_alignment_loss(plain, ep, kl="forward")
    assert got.item() == pytest.approx(kl_qp, rel=1e-6)
    got.backward()
    assert ep.grad is None and plain.grad.abs().sum() > 0
    # forward KL to a detached teacher = soft-label cross-entropy up to the teacher's entropy: grad = p - q
    assert torch.allclose(plain.grad, (torch.tensor([p]) - torch.tensor([q])), atol=1e-6)
    with pytest.raises(ValueError, match="kl='sideways'"):
        losses.response_distribution_alignment_loss(plain, ep, kl="sideways")


def test_rda_gradient_does_not_reach_exemplar_branch():
    plain = logits_of([0.5, 0.25, 0.25]).requires_grad_()
    ep = logits_of([0.25, 0.5, 0.25]).requires_grad_()
    losses.response_distribution_alignment_loss(plain, ep).backward()
    assert ep.grad is None
    assert plain.grad.abs().sum() > 0

    plain.grad = None
    losses.response_distribution_alignment_loss(plain, ep, detach_exemplar=False).backward()  # RDA*
    assert ep.grad is not None and ep.grad.abs().sum() > 0


def test_crt_eq5_eq6_softmax_of_logit_margin():
    pos = logits_of([4 / 6, 1 / 6, 1 / 6])
    neg = logits_of([2 / 5, 1 / 5, 2 / 5])
    # margin = log(pos/neg) = [ln(5/3), ln(5/6), ln(5/12)] up to a constant
    m = [LN((4 / 6) / (2 / 5)), LN((1 / 6) / (1 / 5)), LN((1 / 6) / (2 / 5))]
    expected = -(m[0] - LN(sum(math.exp(v) for v in m)))
    got = losses.contrastive_response_tuning_loss(pos, neg, torch.tensor([0]))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # identical images carry no margin: uniform over the vocabulary
    same = losses.contrastive_response_tuning_loss(pos, pos, torch.tensor([0]))
    assert same.item() == pytest.approx(LN(3), rel=1e-6)


def test_eq7_objective_weights():
    terms = {"loss_van": torch.tensor(1.0), "loss_ep": torch.tensor(2.0),
             "loss_rda": torch.tensor(3.0), "loss_crt": torch.tensor(4.0)}
    assert losses.vitask_objective(terms, alpha=0.5, beta=0.25).item() == pytest.approx(1 + 2 + 1.5 + 1.0)
    stage1 = {k: v for k, v in terms.items() if k != "loss_crt"}
    assert losses.vitask_objective(stage1, alpha=2.0, beta=9.0).item() == pytest.approx(1 + 2 + 6)
