"""A small learned text encoder that stands in for the large text encoders of real models.

The zoo's text models are conditioned on short prompts ("red square moving right", "blue ring").
Instead of a multi-GB language model, a word-level vocabulary and a learned embedding produce
per-token states with their mask and, optionally, a pooled vector. How those become the
transformer's inputs is a model fact (the adapter's ``prompt_conditioning``): HunyuanVideo takes
states, ``encoder_attention_mask`` and ``pooled_projections``; Wan takes the states only, zeroed
after the prompt (``pooled_dim=None``: no pooled vector). The encoder is trained jointly with the
transformer and saved next to it with ``save_pretrained``.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

NULL_TOKEN = "<null>"
UNK_TOKEN = "<unk>"


class PromptEncoder(ModelMixin, ConfigMixin):
    """Word-level prompt encoder: tokenise by whitespace, embed, add positions, pool.

    Args:
        vocab: known words; index 0 and 1 are reserved for ``<null>`` (empty prompt, used for
            classifier-free guidance) and ``<unk>``.
        max_length: tokens per prompt (longer prompts are truncated, shorter ones masked).
        embed_dim: width of the per-token states (the transformer's ``text_embed_dim``).
        pooled_dim: width of the pooled vector (the transformer's ``pooled_projection_dim``), or
            ``None`` for models that take no pooled vector (no pooling head is built).
    """

    @register_to_config
    def __init__(
        self, vocab: list[str], max_length: int = 8, embed_dim: int = 32, pooled_dim: int | None = 32
    ) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(len(vocab) + 2, embed_dim)
        self.position_embedding = nn.Parameter(torch.zeros(max_length, embed_dim))
        self.pool = None if pooled_dim is None else nn.Sequential(
            nn.Linear(embed_dim, pooled_dim), nn.SiLU(), nn.Linear(pooled_dim, pooled_dim))
        self._index = {w: i + 2 for i, w in enumerate(vocab)}

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``[B, max_length]`` (int64) and mask ``[B, max_length]`` (bool).

        An empty prompt becomes the single ``<null>`` token, so every row has one valid token.
        """
        length = self.config.max_length
        ids = torch.zeros(len(prompts), length, dtype=torch.long)
        mask = torch.zeros(len(prompts), length, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            words = prompt.lower().split()[:length]
            tokens = [self._index.get(w, 1) for w in words] or [0]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = True
        return ids, mask

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Encode prompts.

        Returns:
            states ``[B, max_length, embed_dim]`` (masked positions not zeroed), mask
            ``[B, max_length]`` (bool) and pooled ``[B, pooled_dim]`` (``None`` without a pooling head).
        """
        device = self.position_embedding.device
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(device), mask.to(device)
        states = self.token_embedding(ids) + self.position_embedding[None]
        if self.pool is None:
            return states, mask, None
        weights = mask.to(states.dtype)[..., None]
        mean = (states * weights).sum(dim=1) / weights.sum(dim=1)
        return states, mask, self.pool(mean)
