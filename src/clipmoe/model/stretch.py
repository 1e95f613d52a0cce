"""Stretch a CLIP's text positions for long captions (Long-CLIP's knowledge-preserving stretch).

Positions ``0..keep-1`` are kept as they are (they are well trained); each later position i becomes
``factor`` positions linearly interpolated between ``pe[i]`` and ``pe[i+1]``, and the last position is
extrapolated. With CLIP's 77 positions, keep=20 and factor=4 this gives 20 + 57*4 = 248, as the official
CLIP-MoE code does.
"""

from __future__ import annotations

import torch

from .modeling import ClipMoeModel


def stretched_positions(pe: torch.Tensor, keep: int = 20, factor: int = 4) -> torch.Tensor:
    """``[L, D] -> [keep + (L - keep) * factor, D]``."""
    length = pe.shape[0]
    if not 0 < keep < length:
        raise ValueError(f"keep must be in 1..{length - 1}, got {keep}")
    rows = [pe[:keep]]
    for i in range(keep, length):
        nxt = pe[i + 1] if i + 1 < length else pe[i] + (pe[i] - pe[i - 1])  # extrapolate past the end
        for j in range(factor):
            t = j / factor
            rows.append(((1 - t) * pe[i] + t * nxt)[None])
    return torch.cat(rows)


def stretch_text_positions(model: ClipMoeModel, keep: int = 20, factor: int = 4) -> ClipMoeModel:
    """Replace the text position embedding in place by its stretched version and update the config."""
    emb = model.text_model.embeddings
    new = stretched_positions(emb.position_embedding.weight.detach(), keep, factor)
    emb.position_embedding = torch.nn.Embedding(new.shape[0], new.shape[1]).to(new)
    with torch.no_grad():
        emb.position_embedding.weight.copy_(new)
    emb.register_buffer("position_ids", torch.arange(new.shape[0]).expand((1, -1)), persistent=False)
    model.config.text_config.max_position_embeddings = new.shape[0]
    if getattr(model, "tokenizer", None) is not None:
        model.tokenizer.context_length = new.shape[0]
        model.tokenizer.hf.model_max_length = new.shape[0]
    return model
