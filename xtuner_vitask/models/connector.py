"""The exemplar connector of EP: TSM features -> tokens in the LLM's embedding space."""
from torch import nn

from ..errors import VITaskError


class ExemplarConnector(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear, mapping (B, D) or (B, T, D) TSM features to (B, T, H) tokens.

    The same shape as InternVL's own ``mlp1`` projector, which already maps a frozen
    vision feature into this LLM well; the normalisation matters because TSM features
    are unnormalised pre-logits whose scale differs between checkpoints. Kept in
    float32 whatever the VLM's dtype (bf16 rounds small updates of a new module away).
    """

    def __init__(self, feature_dim, llm_hidden_size):
        super().__init__()
        self.feature_dim = feature_dim
        self.proj = nn.Sequential(
            nn.LayerNorm(feature_dim),
            nn.Linear(feature_dim, llm_hidden_size),
            nn.GELU(),
            nn.Linear(llm_hidden_size, llm_hidden_size),
        )

    def forward(self, features):
        if features.shape[-1] != self.feature_dim:
            raise VITaskError(
                f"exemplar features have size {features.shape[-1]} but the connector expects {self.feature_dim}: "
                "the TSM (or exemplar cache) is not the one this model was configured/trained with"
            )
        if features.ndim == 2:  # one CLS feature per image -> one exemplar token
            features = features.unsqueeze(1)
        weight = self.proj[1].weight
        return self.proj(features.to(device=weight.device, dtype=weight.dtype))
