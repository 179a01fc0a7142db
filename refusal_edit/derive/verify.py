"""Accept a derived spec only if the edits it drives are exact on the tiny instance it was derived on.

The hook twin alone would be circular (hooks at wrong sites agree with edits at the same wrong sites), so
besides weight edit == hooked original (ablation, and a variant with a weight per site and layer and a rank-2
basis, what tune can pick) the edited model must carry no r in any hidden state, and every hooked writer
must be needed (without it, r reappears). The accounting that found the writers already showed that they
make up each layer's delta exactly. The checkpoint path is checked too: the plan on the saved tiny model,
written and loaded by transformers, equals the hooked original.

A multimodal wrapper is derived on its language model, but its checkpoint names, tied tensors and stock
class are the wrapper's: `verify_wrapper` repeats the checkpoint check on the whole tiny wrapper (towers
included), loaded with the wrapper's own class, and refuses with the tensor or layer at fault.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from refusal_edit.anatomy import Writer, anatomy
from refusal_edit.arch import VERIFYING, ArchSpec
from refusal_edit.edits.spec import WriterBases, full_ablation
from refusal_edit.errors import RefusalEditError
from refusal_edit.interventions import _projection_hook, edit_hooks
from refusal_edit.linalg import orthonormal, sandwich

TOL = 1e-4


@contextmanager
def registered(spec: ArchSpec, model_type: str) -> Iterator[None]:
    """`spec` answers for `model_type` while the block runs (the tiny model's own type, e.g. a text twin)."""
    old = VERIFYING.get(model_type)
    VERIFYING[model_type] = spec if spec.model_type == model_type else spec.derive(model_type, text_model_type=None)
    try:
        yield
    finally:
        if old is None:
            VERIFYING.pop(model_type, None)
        else:
            VERIFYING[model_type] = old


def _stream(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits (or last hidden state) and every residual state: each layer's input and the final norm's."""
    anat = anatomy(model)
    states: list[torch.Tensor] = []

    def grab(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        states.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    handles = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in [*anat.layers, anat.final_norm]]
    try:
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    logits = getattr(out, "logits", None)
    return (logits if logits is not None else out.last_hidden_state), states


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


def _r_left(states: list[torch.Tensor], r: torch.Tensor) -> float:
    return max(float((h.float() @ r).abs().max()) / max(1.0, float(h.abs().max())) for h in states)


def _weight_edited(model: nn.Module, edit: WriterBases, ids: torch.Tensor):
    from refusal_edit.edits.memory import edited_weights

    with edited_weights(model, edit):
        return _stream(model, ids)


def _variant(r: torch.Tensor, n_layers: int, seed: int) -> WriterBases:
    """A rank-2 edit led by r with a different weight at every site and layer (tune's space, sampled)."""
    g = torch.Generator().manual_seed(seed)
    basis = orthonormal(torch.stack([r, torch.randn(r.numel(), generator=g)]))
    edit = WriterBases(n_layers)
    edit.bases["embedding", None], edit.alphas["embedding", None] = basis, 0.7
    for layer in range(n_layers):
        for site in ("attn", "mlp"):
            edit.bases[site, layer] = basis
            edit.alphas[site, layer] = float(torch.rand(1, generator=g)) * 1.5
    return edit


def _without(model: nn.Module, r: torch.Tensor, writers: list[Writer], skip: int, ids: torch.Tensor) -> float:
    handles = []
    try:
        for i, w in enumerate(writers):
            if i != skip:
                handles.append(w.module.register_forward_hook(_projection_hook(sandwich(r[None], w.gain), 1.0)))
        return _r_left(_stream(model, ids)[1], r)
    finally:
        for h in handles:
            h.remove()


def _checkpoint_path(model: nn.Module, r: torch.Tensor, ids: torch.Tensor, reference: torch.Tensor) -> float:
    """Edit the saved tiny checkpoint with the plan and writer every user gets; load it with transformers."""
    from refusal_edit.checkpoint.layout import open_checkpoint
    from refusal_edit.edits import write_checkpoint
    from refusal_edit.edits.plan import plan_ablation

    with tempfile.TemporaryDirectory() as tmp, _quiet():
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        model.save_pretrained(src)
        ckpt = open_checkpoint(src)
        write_checkpoint(ckpt, plan_ablation(ckpt, r), out)
        edited = type(model).from_pretrained(out, dtype=torch.float32).eval()
        return _close(_stream(edited, ids)[0], reference)


@contextmanager
def _quiet() -> Iterator[None]:
    import os

    old = os.environ.get("REFUSAL_EDIT_QUIET")
    os.environ["REFUSAL_EDIT_QUIET"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("REFUSAL_EDIT_QUIET", None)
        else:
            os.environ["REFUSAL_EDIT_QUIET"] = old


def verify(spec: ArchSpec, model: nn.Module, ids: torch.Tensor, seed: int = 3) -> dict[str, float]:
    """Check `spec` on its tiny model (see module docstring); the worst figures, or a clear error."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(int(model.config.hidden_size), generator=g)
    r = r / r.norm()
    with registered(spec, model.config.model_type):
        anat = anatomy(model)
        n = anat.num_layers
        original, _ = _stream(model, ids)
        with edit_hooks(model, full_ablation(r, n)):
            hooked, _ = _stream(model, ids)
        edited, states = _weight_edited(model, full_ablation(r, n), ids)
        figures = {"ablation": _close(edited, hooked), "r_left": _r_left(states, r)}
        if _close(hooked, original) < 1e-3:
            raise RefusalEditError("the derived edit does not change the tiny model: no writer was found")
        variant = _variant(r, n, seed)
        with edit_hooks(model, variant):
            v_hooked, _ = _stream(model, ids)
        figures["variant"] = _close(_weight_edited(model, variant, ids)[0], v_hooked)
        writers = anat.writers()
        kinds: dict[tuple, int] = {}  # one writer of each kind (module, site, the layer's structure)
        for i, w in enumerate(writers):
            layer = anat.layers[w.layer] if w.layer is not None else None
            shape = None if layer is None else tuple(type(m).__name__ for m in layer.modules())
            kinds.setdefault((w.site, w.name, shape), i)
        for i in kinds.values():
            w = writers[i]
            if _without(model, r, writers, i, ids) <= TOL:
                where = "embedding" if w.layer is None else f"layer {w.layer} {w.site}"
                raise RefusalEditError(f"derived writer {w.name} ({where}) is not needed: the derivation is wrong")
        figures["checkpoint"] = _checkpoint_path(model, r, ids, hooked)
    for what, value in figures.items():
        if value > TOL:
            raise RefusalEditError(
                f"derived {spec.model_type} spec fails verification: {what} differs by {value:.2e} (> {TOL:g})"
            )
    return figures


def _first_difference(a: nn.Module, b: nn.Module) -> str | None:
    """The first parameter or buffer of `a` that `b` does not hold byte for byte, or None."""
    theirs = b.state_dict()
    for name, value in a.state_dict().items():
        other = theirs.get(name)
        if other is None or other.shape != value.shape or not torch.equal(other, value):
            return name
    return None


def _first_layer_off(states: list[torch.Tensor], reference: list[torch.Tensor]) -> str:
    for i, (a, b) in enumerate(zip(states, reference, strict=False)):
        if _close(a, b) > TOL:
            return "the embeddings" if i == 0 else f"the output of layer {i - 1}"
    return "the head (the language model's hidden states agree)"


def _edit_wrapper(model: nn.Module, r: torch.Tensor, ids: torch.Tensor) -> tuple:
    """Save the wrapper, edit the checkpoint with the user's plan and writer, load it with the wrapper's class:
    the edited logits and states, and the hooked original's."""
    from refusal_edit.checkpoint.layout import open_checkpoint
    from refusal_edit.edits import write_checkpoint
    from refusal_edit.edits.plan import plan_ablation

    cls = type(model)
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        model.save_pretrained(src)
        lost = _first_difference(model, cls.from_pretrained(src, dtype=torch.float32))
        if lost is not None:
            raise RefusalEditError(
                f"transformers' {cls.__name__} does not load back its own tiny {model.config.model_type} checkpoint "
                f"({lost} comes back different), so no edit of it can be checked"
            )
        with edit_hooks(model, full_ablation(r, anatomy(model).num_layers)):
            hooked, hooked_states = _stream(model, ids)
        ckpt = open_checkpoint(src)
        write_checkpoint(ckpt, plan_ablation(ckpt, r), out)
        edited = cls.from_pretrained(out, dtype=torch.float32).eval()
        return (*_stream(edited, ids), hooked, hooked_states)


def verify_wrapper(spec: ArchSpec, config: object, seed: int = 3) -> dict[str, float]:
    """Check `spec` (derived on the language model) on the whole tiny wrapper of `config`: the saved
    checkpoint, edited by the planner and writer every user gets and loaded with the wrapper's stock class,
    equals the hooked original (<= TOL) with no r left in the language model's hidden states."""
    from refusal_edit.derive.probe import token_ids
    from refusal_edit.derive.shrink import tiny_wrapper

    model = tiny_wrapper(config)
    kind = spec.model_type
    text = model.config.get_text_config()
    ids = token_ids(int(text.vocab_size))
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(int(text.hidden_size), generator=g)
    r = r / r.norm()
    with registered(spec, model.config.model_type), registered(spec, text.model_type):
        try:
            logits, states, hooked, hooked_states = _edit_wrapper(model, r, ids)
        except RefusalEditError:
            raise
        except Exception as exc:  # transformers' own failures on the tiny wrapper: a refusal, in one line
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise RefusalEditError(
                f"the tiny {kind} wrapper could not be edited and checked ({type(exc).__name__}: {first})"
            ) from exc
    figures = {"wrapper": _close(logits, hooked), "wrapper_r_left": _r_left(states, r)}
    if figures["wrapper"] > TOL:
        where = _first_layer_off(states, hooked_states)
        raise RefusalEditError(
            f"derived {kind} spec fails on the whole wrapper: its edited checkpoint differs from the hooked original "
            f"by {figures['wrapper']:.2e} (> {TOL:g}), first at {where}"
        )
    if figures["wrapper_r_left"] > TOL:
        raise RefusalEditError(f"derived {kind} spec fails on the whole wrapper: r is left in its hidden states")
    return figures
