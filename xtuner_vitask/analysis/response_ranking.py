"""Visual response ranking (paper sec. 4, Fig. 4): how likely is a sample's response given its own
image (positive pair) versus another image with the same instruction and a different response
(negative pair)? Per pair: the mean probability of the response's tokens."""
import numpy as np
import torch
from tqdm import tqdm

from ..errors import VITaskError


def negative_partners(records, seed=0):
    """For each record, the index of a record with the same instruction and a different response (or None)."""
    rng = np.random.default_rng(seed)
    groups = {}
    for i, r in enumerate(records):
        human = next(t["value"] for t in r["conversations"] if t["from"] == "human")
        gpt = next(t["value"] for t in r["conversations"] if t["from"] == "gpt")
        groups.setdefault(human, {}).setdefault(gpt, []).append(i)
    partners = [None] * len(records)
    for responses in groups.values():
        for response, members in responses.items():
            others = [j for other, idx in responses.items() if other != response for j in idx]
            for i in members:
                partners[i] = int(others[rng.integers(len(others))]) if others else None
    return partners


@torch.no_grad()
def token_probabilities(model, inputs, records, image_records, image_folder, use_ep=False):
    """Per record: probabilities (T,) of its response tokens given the image of ``image_records[i]``."""
    from ..evaluation.ranking import exemplar_inputs, pad_sequences, splice_exemplars

    device = next(model.parameters()).device
    batch = inputs.batch(records, image_folder, image_records=image_records, tsm=use_ep)
    seqs = [inputs.sequence([dict(turn) for turn in record["conversations"][:2]], n)
            for record, n in zip(records, batch.n_tiles)]
    input_ids, labels, mask, positions = pad_sequences(seqs, inputs.pad_id, device)
    embeds = model.embed_tokens(input_ids, model.encode_images(torch.cat(batch.tiles).to(device)))
    if use_ep:
        embeds, mask, labels, positions = splice_exemplars(model, embeds, mask, labels, input_ids,
                                                           exemplar_inputs(batch, None, device))
    logits, targets = model.response_logits(embeds, mask, positions, labels)
    probs = torch.softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1).cpu()
    owner = (labels[:, 1:] != -100).nonzero()[:, 0].cpu()
    return [probs[owner == i].numpy() for i in range(len(seqs))]


def response_ranking(model, inputs, records, image_folder, use_ep=False, batch_size=8, seed=0, progress=True):
    """(positive, negative) arrays: mean response-token probability of each record with its own image and with
    its negative partner's image (records without a partner are skipped)."""
    partners = negative_partners(records, seed)
    pairs = [(r, records[j]) for r, j in zip(records, partners) if j is not None]
    if not pairs:
        raise VITaskError("no negative pairs: every instruction has a single response in this data "
                          "(the plot needs two classes under the same instruction)")
    model.eval()
    pos, neg = [], []
    for start in tqdm(range(0, len(pairs), batch_size), desc="response ranking", disable=not progress, unit="batch"):
        batch = pairs[start:start + batch_size]
        own = [p[0] for p in batch]
        pos += [float(p.mean()) for p in token_probabilities(model, inputs, own, own, image_folder, use_ep)]
        neg += [float(p.mean()) for p in token_probabilities(model, inputs, own, [p[1] for p in batch],
                                                             image_folder, use_ep)]
    return np.array(pos), np.array(neg)


def plot_response_ranking(positive, negative, path, title="Visual response ranking"):
    """Normalized density (histogram + Gaussian KDE) of response probabilities for positive and negative pairs."""
    from ..evaluation.plots import _pyplot, _save_atomic

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        bins = np.linspace(0, 1, 31)
        grid = np.linspace(0, 1, 201)
        for values, label, color in ((positive, "positive image", "tab:blue"), (negative, "negative image", "tab:red")):
            ax.hist(values, bins=bins, density=True, alpha=0.35, color=color,
                    label=f"{label} (mean {np.mean(values):.3f})")
            if len(values) > 1 and np.std(values) > 0:
                from scipy.stats import gaussian_kde

                ax.plot(grid, gaussian_kde(values)(grid), color=color, lw=1.5)
        ax.set(xlabel="mean probability of the response tokens", ylabel="density", title=title, xlim=(0, 1))
        ax.legend()
        return _save_atomic(fig, path)
    finally:
        plt.close(fig)
