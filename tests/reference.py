"""An independent reference for every exactness test: what an edit *means*, on the stock transformers model.

It shares nothing with the edit it checks - not `refusal_edit.arch`, `anatomy()`, `linalg`, `interventions` or
`edits.spec` - so that a bug in one of those cannot hide behind a reference that reads the same code. What it
knows comes from reading the transformers modeling code, written down here as a small table per family: the
module whose output is *added to the residual stream* at each site. Acting on that module's whole output
covers everything inside it (biases, MoE experts in any layout, shared experts, per-module multipliers).

Sandwich-norm families add a norm's output, not the writer's: the edit projects the norm's *input* against
normalize(g * r), with `g` measured from the norm module itself (its output on a vector of ones), never from
its weight and an offset; the removal check needs no gain at all (it reads the norm's output).

A new family is one entry of `FAMILIES` (rows of (module path, kind)); `decoder()` writes the common shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

Kind = Literal["embedding", "layer", "attn", "mlp", "attn_post_norm", "mlp_post_norm", "final_norm"]
SITES = ("attn", "mlp")


class Row(NamedTuple):
    """One module of a family. `path` is dotted from the model object; `{i}` stands for the layer index (a
    layer without that module - a hybrid's other mixer - is skipped). Kinds:
    `embedding`: its output is the residual stream's first term; `layer`: a decoder layer (its input is the
    residual stream); `attn` / `mlp`: its output is added to the stream at that site, times the config
    attribute `scale` if given; `attn_post_norm` / `mlp_post_norm`: the norm between that site's writers and
    the add (sandwich norms); `final_norm`: its input is the last residual state."""

    path: str
    kind: Kind
    scale: str | None = None


def decoder(
    root: str = "model",
    attn: tuple[str, ...] = ("self_attn",),
    mlp: tuple[str, ...] = ("mlp",),
    post_norms: tuple[str, str] | None = None,
    embeddings: tuple[str, ...] = ("embed_tokens",),
    layers: str = "layers",
    final: str = "norm",
    scales: dict[str, str] | None = None,
) -> list[Row]:
    """Rows of a decoder-only model whose layers sit at `root.layers.{i}` (names relative to the layer)."""
    scales = scales or {}
    layer = f"{root}.{layers}.{{i}}"
    rows = [Row(f"{root}.{e}", "embedding") for e in embeddings]
    rows.append(Row(layer, "layer"))
    rows += [Row(f"{layer}.{m}", "attn", scales.get(m)) for m in attn]
    rows += [Row(f"{layer}.{m}", "mlp", scales.get(m)) for m in mlp]
    if post_norms is not None:
        rows += [Row(f"{layer}.{post_norms[0]}", "attn_post_norm"), Row(f"{layer}.{post_norms[1]}", "mlp_post_norm")]
    rows.append(Row(f"{root}.{final}", "final_norm"))
    return rows


GEMMA_SANDWICH = ("post_attention_layernorm", "post_feedforward_layernorm")
GRANITE = {"self_attn": "residual_multiplier", "mlp": "residual_multiplier", "block_sparse_moe": "residual_multiplier"}

# From the transformers 5 modeling code (the decoder layer's forward: what is added to `residual`).
FAMILIES: dict[str, list[Row]] = {
    "llama": decoder(),
    "mistral": decoder(),
    "qwen2": decoder(),
    "qwen3": decoder(),
    "gemma": decoder(),  # the scaled embedding module multiplies by sqrt(hidden) itself
    "gemma2": decoder(post_norms=GEMMA_SANDWICH),
    "gemma3_text": decoder(post_norms=GEMMA_SANDWICH),
    "gemma3": decoder("model.language_model", post_norms=GEMMA_SANDWICH),
    "mistral3": decoder("model.language_model"),
    "phi3": decoder(),  # resid_*_dropout after the writers: identity in eval
    "gpt2": decoder("transformer", ("attn",), ("mlp",), embeddings=("wte", "wpe"), layers="h", final="ln_f"),
    "gpt_neox": decoder("gpt_neox", ("attention",), embeddings=("embed_in",), final="final_layer_norm"),
    "olmo2": decoder(post_norms=GEMMA_SANDWICH),
    "olmo3": decoder(post_norms=GEMMA_SANDWICH),
    "exaone4": decoder(post_norms=GEMMA_SANDWICH),
    "glm4": decoder(post_norms=("post_self_attn_layernorm", "post_mlp_layernorm")),
    "granite": decoder(scales=GRANITE),  # embedding_multiplier is applied outside the module: a scalar
    "granitemoe": decoder(mlp=("block_sparse_moe",), scales=GRANITE),
    "mixtral": decoder(),
    "phimoe": decoder(),
    "qwen2_moe": decoder(),  # the sparse block's output includes the gated shared expert
    "qwen3_moe": decoder(),
    "qwen3_next": decoder(attn=("self_attn", "linear_attn")),
    "gpt_oss": decoder(),
    "glm4_moe": decoder(),  # routed + shared experts summed inside `mlp`
    "deepseek_v3": decoder(),
    "smollm3": decoder(),
    "cohere2": decoder(),  # parallel block: residual + attn + mlp
    "seed_oss": decoder(),
    "ernie4_5": decoder(),
    "falcon_h1": decoder(
        attn=("self_attn", "mamba"),
        mlp=("feed_forward",),
        final="final_layernorm",
        scales={"self_attn": "attention_out_multiplier", "mamba": "ssm_out_multiplier"},
    ),
    "lfm2": decoder(attn=("self_attn", "conv"), mlp=("feed_forward",), final="embedding_norm"),
}

# (site, layer) -> (rows [k, H] spanning what to remove, weight): the edit, stated by the test from its definition.
Basis = Callable[[str, int | None], tuple[torch.Tensor, float]]


def uniform(r: torch.Tensor, alpha: float = 1.0) -> Basis:
    """The paper's edit: one direction, the same weight everywhere."""
    rows = r.reshape(1, -1)
    return lambda _site, _layer: (rows, alpha)


def orth(rows: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis [k, H] (float64) of the rows' span, by QR."""
    q, _ = torch.linalg.qr(rows.detach().double().T)
    return q.T


def measured_gain(norm: nn.Module, hidden: int) -> torch.Tensor:
    """The gain a norm applies, measured from its behaviour: its output on a vector of ones (rms 1), up to a
    positive scalar (1 / sqrt(1 + eps)) that normalization removes. Checked to be an RMS norm (no centring)."""
    p = next(norm.parameters())
    with torch.no_grad():
        g = norm(torch.ones(1, 1, hidden, dtype=p.dtype)).reshape(-1).double()
        x = torch.randn(1, 1, hidden, generator=torch.Generator().manual_seed(0), dtype=p.dtype)
        got = norm(x).reshape(-1).double()
    want = g * x.reshape(-1).double()
    assert torch.allclose(got / got.norm(), want / want.norm(), atol=1e-5), "not an RMS norm: the rule does not hold"
    return g


@dataclass
class Entry:
    kind: Kind
    layer: int | None
    path: str
    module: nn.Module
    scale: float

    @property
    def site(self) -> str:
        return "embedding" if self.kind == "embedding" else self.kind.removesuffix("_post_norm")


@dataclass
class Located:
    """The family's modules in one model: `writes` are what is added to the stream (a post norm replaces the
    writers of its site), `writers` the modules that compute a site's output (for a weight-level check)."""

    n_layers: int
    hidden: int
    layers: list[nn.Module]
    final_norm: nn.Module
    writes: list[Entry]
    writers: list[Entry]
    post_norms: dict[tuple[str, int], nn.Module]

    def site_write(self, site: str, layer: int) -> list[Entry]:
        return [e for e in self.writes if e.site == site and e.layer == layer]


def locate(model: nn.Module, rows: list[Row]) -> Located:
    """Every row's modules in `model`, checked: each layer has a decoder layer and a write at each site."""
    cfg = model.config.get_text_config()
    n_layers, hidden = int(cfg.num_hidden_layers), int(cfg.hidden_size)
    entries: list[Entry] = []
    for row in rows:
        found = 0
        for i in range(n_layers) if "{i}" in row.path else [None]:
            try:
                module = model.get_submodule(row.path.format(i=i))
            except AttributeError:  # a hybrid's layer has one of its mixers
                continue
            scale = float(getattr(cfg, row.scale)) if row.scale else 1.0
            entries.append(Entry(row.kind, i, row.path.format(i=i), module, scale))
            found += 1
        assert found, f"no module of the model is at {row.path}"
    layers = [e.module for e in entries if e.kind == "layer"]
    finals = [e.module for e in entries if e.kind == "final_norm"]
    assert len(layers) == n_layers and len(finals) == 1, "the table does not describe this model"
    post = {(e.site, e.layer): e.module for e in entries if e.kind.endswith("_post_norm")}
    writers = [e for e in entries if e.kind in ("embedding", *SITES)]
    writes = [e for e in writers if (e.site, e.layer) not in post]
    writes += [e for e in entries if e.kind.endswith("_post_norm")]
    located = Located(n_layers, hidden, layers, finals[0], writes, writers, post)  # type: ignore[arg-type]
    for i in range(n_layers):
        for site in SITES:
            assert located.site_write(site, i), f"layer {i} has no {site} write in the table"
    return located


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output: Any, value: torch.Tensor) -> Any:
    return (value, *output[1:]) if isinstance(output, tuple) else value


def _project(x: torch.Tensor, q: torch.Tensor, alpha: float) -> torch.Tensor:
    """x minus alpha x its part in span(q), in float32 as the model computes (the basis is exact to float64):
    float64 here moves Qwen3-Next's gated delta net (a chaotic recurrence) by 1e-4 on its own."""
    xf, qf = x.float(), q.float()
    return (xf - alpha * (xf @ qf.T) @ qf).to(x.dtype)


def gain_basis(located: Located, site: str, layer: int | None, rows: torch.Tensor) -> torch.Tensor:
    """What a site's writers must lose so that what reaches the stream loses `rows`: the rows themselves, or
    normalize(g * r) behind a post norm of gain g."""
    norm = located.post_norms.get((site, layer)) if layer is not None else None  # type: ignore[arg-type]
    return orth(rows) if norm is None else orth(rows.double() * measured_gain(norm, located.hidden))


@contextmanager
def projected(model: nn.Module, rows: list[Row], basis: Basis) -> Iterator[None]:
    """While active: every write into the residual stream loses `alpha` x the span of its site's basis (behind a
    post norm, the norm's input loses the span of g * r)."""
    located = locate(model, rows)
    with ExitStack() as stack:
        for e in located.writes:
            vecs, alpha = basis(e.site, e.layer)
            if alpha == 0:
                continue
            if e.kind.endswith("_post_norm"):
                q = gain_basis(located, e.site, e.layer, vecs)

                def pre(_m, args, kwargs, q=q, alpha=alpha):
                    if args:
                        return (_project(args[0], q, alpha), *args[1:]), kwargs
                    return args, {**kwargs, "hidden_states": _project(kwargs["hidden_states"], q, alpha)}

                handle = e.module.register_forward_pre_hook(pre, with_kwargs=True)
            else:
                q = orth(vecs)

                def post(_m, _a, out, q=q, alpha=alpha):
                    return _replace_first(out, _project(_first(out), q, alpha))

                handle = e.module.register_forward_hook(post)
            stack.callback(handle.remove)
        yield


def _add_to_input(vector: torch.Tensor):
    def pre(_m, args, kwargs):
        if args:
            h = args[0]
            return (h + vector.to(h.dtype), *args[1:]), kwargs
        h = kwargs["hidden_states"]
        return args, {**kwargs, "hidden_states": h + vector.to(h.dtype)}

    return pre


@contextmanager
def added(model: nn.Module, rows: list[Row], vector: torch.Tensor, layer: int, site: str = "input") -> Iterator[None]:
    """While active: `vector` is added to the residual stream at the input of `layer` (site `input`), or right
    after `layer`'s attention write (site `attn`: to the layer's first attention write, over its multiplier)."""
    located = locate(model, rows)
    if site == "input":
        handle = located.layers[layer].register_forward_pre_hook(_add_to_input(vector.float()), with_kwargs=True)
    else:
        e = located.site_write("attn", layer)[0]
        w = vector.float() / e.scale

        def post(_m, _a, out):
            return _replace_first(out, _first(out) + w.to(_first(out).dtype))

        handle = e.module.register_forward_hook(post)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class Trace:
    logits: torch.Tensor
    states: list[torch.Tensor]  # the residual stream: each layer's input, then the final norm's input
    writes: dict[tuple[str, int | None, str], torch.Tensor]  # (site, layer, path) -> what is added to the stream


def trace(model: nn.Module, rows: list[Row], x: torch.Tensor) -> Trace:
    """One forward pass, recording the residual stream and every write into it."""
    located = locate(model, rows)
    states: list[torch.Tensor] = []
    writes: dict[tuple[str, int | None, str], torch.Tensor] = {}

    def grab(_m, args, kwargs):
        states.append((args[0] if args else kwargs["hidden_states"]).detach())

    with ExitStack() as stack:
        for m in [*located.layers, located.final_norm]:
            stack.callback(m.register_forward_pre_hook(grab, with_kwargs=True).remove)
        for e in located.writes:

            def keep(_m, _a, out, key=(e.site, e.layer, e.path)):
                writes[key] = _first(out).detach()

            stack.callback(e.module.register_forward_hook(keep).remove)
        with torch.no_grad():
            logits = model(x).logits
    return Trace(logits, states, writes)


def largest_left(tensors: list[torch.Tensor], rows: torch.Tensor) -> float:
    """The largest component along the span of `rows`, relative to the tensors' scale (at least 1)."""
    q = orth(rows)
    return max(float((t.double() @ q.T).abs().max()) / max(1.0, float(t.abs().max())) for t in tensors)


def assert_removed(model: nn.Module, rows: list[Row], x: torch.Tensor, basis: Basis, tol: float = 1e-4) -> Trace:
    """Every write whose weight is 1 has nothing left along its basis; with one basis everywhere at weight 1 (the
    paper's edit), nothing is left in any residual state either."""
    t = trace(model, rows, x)
    bases = {}
    for (site, layer, path), out in t.writes.items():
        vecs, alpha = bases[site, layer] = basis(site, layer)
        if alpha == 1:
            assert largest_left([out], vecs) <= tol, f"{path} still writes along the basis"
    first = next(iter(bases.values()))[0]
    if all(a == 1 and torch.equal(v, first) for v, a in bases.values()):
        assert largest_left(t.states, first) <= tol, "the residual stream keeps a component along r"
    return t
