"""VITask's objectives as pure functions, one per equation of the paper (sec. 4).

All take response-token rows: ``logits`` of shape (T, V) holding, for every
response token of the batch, the LLM's next-token logits at the position that
predicts it, and ``targets`` (T,) with the token ids. ``response_rows`` cuts
them out of (B, L, V) model outputs. Every loss is a mean over response tokens,
as XTuner's instruction tuning averages its cross-entropy.
"""
import torch.nn.functional as F

IGNORE_INDEX = -100


def response_rows(logits, labels):
    """(B, L, V) logits and (B, L) labels -> (T, V) rows predicting the T response tokens, and (T,) targets.

    Position t predicts token t+1; rows come out in batch-major token order, so
    two passes over the same responses (plain, exemplar-prompted, negative image)
    give aligned rows even when their prompts differ in length.
    """
    shifted_labels = labels[:, 1:]
    keep = shifted_labels != IGNORE_INDEX
    return logits[:, :-1][keep], shifted_labels[keep]


def vanilla_loss(logits, targets):
    """Eq. (1) L^Van: -log p(response | image, instruction), mean over response tokens."""
    return F.cross_entropy(logits.float(), targets)


def exemplar_prompting_loss(ep_logits, targets):
    """Eq. (2) L^EP: -log p(response | image, exemplar, instruction) from the exemplar-prompted pass."""
    return F.cross_entropy(ep_logits.float(), targets)


RDA_KL = ("reverse", "forward")


def response_distribution_alignment_loss(logits, ep_logits, detach_exemplar=True, kl="reverse"):
    """Eq. (3) L^RDA: KL(p(response | image) || p(response | image, exemplar)), mean over response tokens.

    The exemplar-prompted side is the teacher, so its gradient is detached; with
    ``detach_exemplar=False`` this is the paper's RDA* ablation. ``kl="reverse"`` is eq. 3 as printed
    (the plain model's distribution first: mode-seeking); ``kl="forward"`` swaps the sides,
    KL(teacher || plain) as in knowledge distillation -- not the paper, a diagnostic for the ablation.
    """
    if kl not in RDA_KL:
        raise ValueError(f"kl={kl!r}: choose one of {RDA_KL}")
    teacher = F.log_softmax(ep_logits.float(), dim=-1)
    if detach_exemplar:
        teacher = teacher.detach()
    student = F.log_softmax(logits.float(), dim=-1)
    first, second = (student, teacher) if kl == "reverse" else (teacher, student)
    # KL(P || Q) = sum_v P (log P - log Q)
    return (first.exp() * (first - second)).sum(dim=-1).mean()


def contrastive_response_tuning_loss(pos_logits, neg_logits, targets):
    """Eqs. (5)-(6) L^CRT: -log Softmax(y_pos - y_neg)[target], per response token, mean over tokens.

    ``pos_logits`` come from the true image, ``neg_logits`` from a negative image
    (same instruction, different response) followed by the same response tokens.
    """
    margin = pos_logits.float() - neg_logits.float()
    return F.cross_entropy(margin, targets)


def vitask_objective(losses, alpha, beta):
    """Eq. (7): L^Van + L^EP + alpha L^RDA + beta L^CRT over the terms present (stage 1 has no CRT)."""
    weights = {"loss_van": 1.0, "loss_ep": 1.0, "loss_rda": alpha, "loss_crt": beta}
    return sum(weights[name] * value for name, value in losses.items())
