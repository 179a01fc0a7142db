"""Locate, in a loaded model, the modules the architecture table names (layers, writers, norms)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from refusal_edit.arch import ArchSpec, get_spec, text_config
from refusal_edit.errors import RefusalEditError


@dataclass
class Anatomy:
    """The residual-stream structure of one loaded model."""

    spec: ArchSpec
    layers: nn.ModuleList
    embeddings: list[nn.Module]
    final_norm: nn.Module
    hidden_size: int
    config: Any

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def attn(self, layer: int) -> nn.Module:
        return getattr(self.layers[layer], self.spec.attn)

    def mlp(self, layer: int) -> nn.Module:
        return getattr(self.layers[layer], self.spec.mlp)

    def attention_write(self, layer: int) -> tuple[nn.Module, float]:
        """The module whose output the attention adds to the residual stream, and the factor applied
        after it (Granite's residual multiplier). Sandwich norms: the post-attention norm itself."""
        if self.spec.post_norms is not None:
            return getattr(self.layers[layer], self.spec.post_norms[0]), 1.0
        return self.attn(layer), self.spec.residual_scale(self.config)

    def post_norm_gain(self, layer: int, site: str) -> torch.Tensor | None:
        """Gain g of the norm between the `site` projection and the residual add (sandwich norms)."""
        if self.spec.post_norms is None:
            return None
        name = self.spec.post_norms[0] if site == "attn" else self.spec.post_norms[1]
        weight = getattr(self.layers[layer], name).weight
        return weight.detach().float() + self.spec.norm_offset


def anatomy(model: nn.Module) -> Anatomy:
    """Find the decoder layers (the ModuleList named by the spec with one entry per layer) and siblings."""
    cfg = text_config(model.config)
    spec = get_spec(cfg.model_type)
    n_layers = int(cfg.num_hidden_layers)
    for name, module in model.named_modules():
        is_list = isinstance(module, nn.ModuleList)
        if is_list and name.split(".")[-1] == spec.layers and len(module) == n_layers:
            parent_name = name.rsplit(".", 1)[0] if "." in name else ""
            parent = model.get_submodule(parent_name)
            try:
                embeddings = [parent.get_submodule(e) for e in spec.embeddings]
                final_norm = parent.get_submodule(spec.final_norm)
            except AttributeError as exc:
                raise RefusalEditError(f"model does not have the {spec.model_type} layout: {exc}") from exc
            return Anatomy(spec, module, embeddings, final_norm, int(cfg.hidden_size), cfg)
    raise RefusalEditError(f"could not find {n_layers} decoder layers named {spec.layers!r} in the model")
