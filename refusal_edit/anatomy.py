"""Locate, in a loaded model, the modules the architecture table names (layers, writers, norms)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from refusal_edit.arch import LAYER_SITES, ArchSpec, Site, spec_for_config, text_config
from refusal_edit.errors import RefusalEditError


@dataclass(frozen=True)
class Writer:
    """One module whose output is added to the residual stream (or enters it through a sandwich norm).

    `layer` is None for embeddings. `gain` is the post-projection norm's gain where one follows the
    writer (the direction to remove is then transformed by `linalg.sandwich`). `scale` multiplies the
    output before the residual add (Granite's residual multiplier); `norm` is that sandwich norm module.
    """

    site: Site
    layer: int | None
    name: str
    module: nn.Module
    gain: torch.Tensor | None = None
    scale: float = 1.0
    norm: nn.Module | None = None


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

    def _chain(self, block: nn.Module, names: tuple[str, ...]) -> tuple[torch.Tensor | None, nn.Module | None]:
        """The product of the gains of the norms `names` (as each applies it), and the outermost of them."""
        if not names:
            return None, None
        from accelerate.utils import align_module_device

        gain = None
        for name in names:
            norm = block.get_submodule(name)
            with align_module_device(norm):  # an offloaded norm's weight is on the meta device until then
                g = norm.weight.detach().float() + self.spec.norm_offset  # a new tensor: outlives the context
            gain = g if gain is None else gain * g
        return gain, norm

    def site_writers(self, layer: int, site: Site) -> list[Writer]:
        """The children of `layer` that write at `site` (hybrid layers have one of the alternatives)."""
        spec_site = self.spec.site(site)
        block = self.layers[layer]
        scales = dict(self.spec.output_scales)
        out = []
        for name in spec_site.modules:
            try:
                module = block.get_submodule(name)
            except AttributeError:
                continue
            gain, norm = self._chain(block, spec_site.norms(name))
            scale = 1.0 if norm is not None else scales.get(name, self.spec.residual_scale)(self.config)
            out.append(Writer(site, layer, name, module, gain, scale, norm))
        if not out and not spec_site.optional:
            raise RefusalEditError(
                f"layer {layer} has none of the {site} writers the table names ({', '.join(spec_site.modules)})"
            )
        return out

    def writers(self) -> list[Writer]:
        """Every residual writer: embeddings first, then each layer's sites in order."""
        out = [
            Writer("embedding", None, name, m) for name, m in zip(self.spec.embeddings, self.embeddings, strict=True)
        ]
        for layer in range(self.num_layers):
            for site in LAYER_SITES:
                out += self.site_writers(layer, site)
        return out

    def attention_write(self, layer: int) -> tuple[nn.Module, float]:
        """The module whose output is the attention write of `layer`, and the factor applied after it.
        Sandwich norms: the post-attention norm itself (what a bias after the add would be)."""
        writers = self.site_writers(layer, "attn")
        if not writers:
            raise RefusalEditError(f"layer {layer} of {self.spec.model_type} has no attention writer to add after")
        writer = writers[0]
        if writer.norm is not None:
            return writer.norm, 1.0
        return writer.module, writer.scale


def anatomy(model: nn.Module) -> Anatomy:
    """Find the decoder layers (the ModuleList named by the spec with one entry per layer) and siblings.

    The list must sit beside the spec's embeddings and final norm: a multimodal wrapper's vision encoder
    also has a `layers` list (possibly as long), but no token embedding beside it.
    """
    spec = spec_for_config(model.config)
    cfg = text_config(model.config)
    n_layers = int(cfg.num_hidden_layers)
    missing: list[str] = []
    for name, module in model.named_modules():
        if not (isinstance(module, nn.ModuleList) and name.split(".")[-1] == spec.layers and len(module) == n_layers):
            continue
        parent = model.get_submodule(name.rsplit(".", 1)[0] if "." in name else "")
        try:
            embeddings = [parent.get_submodule(e) for e in spec.embeddings]
            final_norm = parent.get_submodule(spec.final_norm)
        except AttributeError as exc:
            missing.append(str(exc))
            continue
        return Anatomy(spec, module, embeddings, final_norm, int(cfg.hidden_size), cfg)
    if missing:
        raise RefusalEditError(f"model does not have the {spec.model_type} layout: {missing[0]}")
    raise RefusalEditError(f"could not find {n_layers} decoder layers named {spec.layers!r} in the model")
