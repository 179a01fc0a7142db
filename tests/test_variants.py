"""Edit variants (issue 11): partial per-layer strengths, per-layer and interpolated directions, projected
directions, rank-k subspaces and exact norm preservation, on every supported architecture.

Variants with a hook twin are written as checkpoints, loaded with stock transformers and compared with
the original model under `edit_hooks` (float32, <= 1e-4). Norm preservation has no twin: it is checked by
its invariants (no component left along the basis, every written vector keeps its norm) and against a
dense float64 reference written here from the definition.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny import CONFIGS, HIDDEN, build, load, save, token_batch

from refusal_edit.anatomy import anatomy
from refusal_edit.arch import classify, get_spec
from refusal_edit.checkpoint.layout import open_checkpoint
from refusal_edit.edits.memory import edited_weights
from refusal_edit.edits.plan import plan_edit
from refusal_edit.edits.spec import DirectionBank, EditSpec, Strength, resolve
from refusal_edit.edits.write import write_checkpoint
from refusal_edit.errors import RefusalEditError
from refusal_edit.interventions import edit_hooks
from refusal_edit.linalg import orthonormal, sandwich

ARCHS = sorted(CONFIGS)
TOL = 1e-4
N_POS = 3


def bank(n_layers: int = 3, seed: int = 7) -> DirectionBank:
    g = torch.Generator().manual_seed(seed)
    md = torch.randn(N_POS, n_layers + 1, HIDDEN, generator=g)
    hm = torch.randn(N_POS, n_layers + 1, HIDDEN, generator=g)
    return DirectionBank(md[-1, 2].clone(), position=-1, layer=2, mean_diff=md, harmless_mean=hm)


KERNEL = EditSpec(
    attn=Strength(weight=0.9, peak=1.0, width=1.5, floor=0.2),
    mlp=Strength(per_layer=(0.3, 1.0, 0.6)),
    embedding=0.5,
    direction="layer",
    projected=True,
)
SUBSPACE = EditSpec(direction="interpolate", index=1.4, rank=3, basis="positions", mlp=Strength(weight=0.7))
FULL_LAYERWISE = EditSpec(direction="layer", rank=2, basis="layers", projected=True)
DOWNSTREAM = EditSpec(
    attn=Strength(weight=1.1, peak=1.5, width=2.0, floor=0.9), mlp=Strength(weight=0.5), embedding=0.7,
    direction="downstream",
)  # fmt: skip
VARIANTS = {"kernel": KERNEL, "subspace": SUBSPACE, "full-layerwise": FULL_LAYERWISE, "downstream": DOWNSTREAM}


def write_edit(src, out, spec: EditSpec, b: DirectionBank):
    ckpt = open_checkpoint(src)
    text = ckpt.config.get("text_config") or ckpt.config
    n_layers = int(text.get("num_hidden_layers") or text.get("n_layer"))
    plan = plan_edit(ckpt, resolve(spec, b, n_layers))
    write_checkpoint(ckpt, plan, out)
    return load(out)


def writer_outputs(model, x):
    """Every writer's output (before any sandwich norm), keyed like the resolved edit."""
    seen: dict[tuple[str, int | None, str], torch.Tensor] = {}
    handles = []
    for w in anatomy(model).writers():

        def hook(_m, _a, out, key=(w.site, w.layer, w.name)):
            seen[key] = (out[0] if isinstance(out, tuple) else out).detach()

        handles.append(w.module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("model_type", ARCHS)
def test_variant_checkpoint_equals_its_hook_twin(model_type, variant, tmp_path):
    model = build(model_type)
    src = save(model, tmp_path / "model", with_tokenizer=False)
    spec, b = VARIANTS[variant], bank()
    edit = resolve(spec, b, model.config.get_text_config().num_hidden_layers)
    x = token_batch()
    with torch.no_grad(), edit_hooks(model, edit):
        reference = model(x).logits
    with torch.no_grad():
        original = model(x).logits
    edited = write_edit(src, tmp_path / "out", spec, b)
    with torch.no_grad():
        logits = edited(x).logits
    assert (logits - reference).abs().max().item() <= TOL
    assert (logits - original).abs().max().item() > 1e-2
    # The in-memory weight edit (what tune uses for variants without hooks) is the same edit.
    with torch.no_grad(), edited_weights(model, edit):
        in_memory = model(x).logits
    assert (in_memory - reference).abs().max().item() <= TOL
    with torch.no_grad():
        assert torch.equal(model(x).logits, original)  # restored

    if variant == "full-layerwise":  # weight 1 everywhere: nothing of any writer's basis is left
        gains = {(w.site, w.layer): w.gain for w in anatomy(edited).writers()}
        for (site, layer, _name), out in writer_outputs(edited, x).items():
            q = sandwich(edit.at(site, layer)[0], gains[site, layer])
            assert (out.float() @ q.T).abs().max().item() <= TOL, (site, layer)


def dense_norm_preserving(model, edit, name: str, weight: torch.Tensor, spec) -> torch.Tensor | None:
    """Reference from the definition, in float64: project each written vector, restore its norm."""
    m = classify(spec, name)
    if m is None:
        return None
    basis, alpha = edit.at(m.rule.site, m.layer)
    gain = None
    norm_name = spec.post_norm_name(m.layer, m.rule.site) if m.layer is not None else None
    if norm_name is not None:
        prefix = name.split(f"{spec.layers}.{m.layer}.")[0]
        gain = dict(model.named_parameters())[prefix + norm_name].detach().float() + spec.norm_offset
    q = sandwich(basis, gain).double()
    w = weight.detach().double()
    hidden = q.shape[1]
    if m.rule.residual_last:
        vecs = w.reshape(-1, hidden)  # rows are written vectors
        new = vecs - alpha * (vecs @ q.T) @ q
        return rescaled(new, vecs.norm(dim=1, keepdim=True), new.norm(dim=1, keepdim=True)).reshape(w.shape)
    if w.dim() == 3:  # [E, H, I]: columns of every expert
        out = torch.stack([dense_cols(e, q, alpha) for e in w])
        return out
    if w.dim() == 1:
        new = w - alpha * q.T @ (q @ w)
        return rescaled(new, w.norm(), new.norm())
    return dense_cols(w, q, alpha)


def dense_cols(w: torch.Tensor, q: torch.Tensor, alpha: float) -> torch.Tensor:
    new = w - alpha * q.T @ (q @ w)
    return rescaled(new, w.norm(dim=0, keepdim=True), new.norm(dim=0, keepdim=True))


def rescaled(new: torch.Tensor, old_norm: torch.Tensor, new_norm: torch.Tensor) -> torch.Tensor:
    """Back to the old norm; a vector with nothing left (e.g. a zero padding row) stays as it is."""
    return torch.where(new_norm > 0, new * old_norm / new_norm.clamp_min(1e-300), new)


@pytest.mark.parametrize("model_type", ARCHS)
def test_norm_preservation_invariants_and_dense_reference(model_type, tmp_path):
    model = build(model_type)
    src = save(model, tmp_path / "model", with_tokenizer=False)
    b = bank()
    spec = EditSpec(direction="layer", rank=2, preserve_norm=True)
    edit = resolve(spec, b, model.config.get_text_config().num_hidden_layers)
    edited = write_edit(src, tmp_path / "out", spec, b)
    arch = get_spec(model.config.get_text_config().model_type)
    before = dict(model.named_parameters())
    after = dict(edited.named_parameters())
    checked = 0
    for name, w in before.items():
        ref = dense_norm_preserving(model, edit, name, w, arch)
        if ref is None:
            continue
        got = after[name].detach().double()
        assert (got - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item()), name
        checked += 1
    assert checked >= 7  # embedding + 2 writers x 3 layers at least
    # Invariants on the model's own writers: nothing along each basis, same norms as before.
    x = token_batch()
    gains = {(w.site, w.layer): w.gain for w in anatomy(edited).writers()}
    for (site, layer, _name), out in writer_outputs(edited, x).items():
        q = sandwich(edit.at(site, layer)[0], gains[site, layer])
        assert (out.float() @ q.T).abs().max().item() <= TOL, (site, layer)
    emb = edited.get_input_embeddings().weight.detach()
    orig = model.get_input_embeddings().weight.detach()
    rel = (emb.norm(dim=1) - orig.norm(dim=1)).abs() / orig.norm(dim=1).clamp_min(1e-12)
    assert rel.max().item() <= 1e-5
    # Without a hook twin, hooks refuse; the in-memory weight edit equals the written checkpoint.
    with pytest.raises(RefusalEditError, match="no activation-hook twin"), edit_hooks(model, edit):
        pass
    with torch.no_grad(), edited_weights(model, edit):
        in_memory = model(x).logits
    with torch.no_grad():
        assert (in_memory - edited(x).logits).abs().max().item() <= TOL


def test_strength_kernel_and_window():
    k = Strength(weight=1.0, peak=4, width=2, floor=0.25)
    assert [round(k.alpha(i, 8), 3) for i in range(8)] == [0.25, 0.25, 0.25, 0.625, 1.0, 0.625, 0.25, 0.25]
    assert Strength().alpha(5, 8) == 1.0
    w = Strength.window(2, 5)
    assert [w.alpha(i, 6) for i in range(6)] == [0, 0, 1, 1, 1, 0]
    assert [Strength.window(None, 2).alpha(i, 4) for i in range(4)] == [1, 1, 0, 0]
    assert Strength.from_json(w.to_json()) == w
    assert Strength.from_json(k.to_json()) == k
    listed = Strength(per_layer=(0.0, 1.0, 0.5, 0.0, 1.0, 1.0))
    assert Strength.from_json(listed.to_json()) == listed
    with pytest.raises(RefusalEditError, match="per-layer weights give 6 values for 8 layers"):
        listed.alpha(0, 8)
    with pytest.raises(RefusalEditError, match="empty layer window"):
        Strength.from_json({"start": 4, "stop": 2})
    with pytest.raises(RefusalEditError, match="must be a number"):
        Strength.from_json({"weight": "x"})


def test_spec_json_round_trip_and_errors():
    for spec in VARIANTS.values():
        assert EditSpec.from_json(spec.to_json()) == spec
    with pytest.raises(RefusalEditError, match="unknown edit spec keys: bogus"):
        EditSpec.from_json({"bogus": 1})
    with pytest.raises(RefusalEditError, match="needs `index`"):
        EditSpec.from_json({"direction": "interpolate"})
    with pytest.raises(RefusalEditError, match="rank must be at least 1"):
        EditSpec.from_json({"rank": 0})
    with pytest.raises(RefusalEditError, match=r"candidates\.safetensors"):
        resolve(EditSpec(direction="layer"), DirectionBank(torch.randn(HIDDEN), position=-1, layer=1), 3)


def test_resolution_facts():
    b = bank()
    # The paper's edit: the chosen direction everywhere at weight 1.
    plain = resolve(EditSpec(), DirectionBank(b.chosen), 3)
    r = b.chosen / b.chosen.norm()
    for key, basis in plain.bases.items():
        assert basis.shape == (1, HIDDEN) and torch.allclose(basis[0], r, atol=1e-6), key
        assert plain.alphas[key] == 1.0
    # Per layer: the writers of layer l use the candidate of the stream they write into (l + 1).
    layerwise = resolve(EditSpec(direction="layer"), b, 3)
    for layer in range(3):
        v = b.mean_diff[-1, layer + 1]
        assert torch.allclose(layerwise.at("mlp", layer)[0][0], v / v.norm(), atol=1e-6)
    # Downstream: the chosen direction (layer 2) for the embedding and the writers into streams 1 and 2, the
    # own candidate of stream 3 for layer 2's writers.
    down = resolve(EditSpec(direction="downstream"), b, 3)
    assert all(torch.allclose(down.at(site, layer)[0][0], r, atol=1e-6) for site in ("attn", "mlp") for layer in (0, 1))
    assert torch.allclose(down.at("embedding", None)[0][0], r, atol=1e-6)
    assert torch.allclose(down.at("attn", 2)[0][0], layerwise.at("attn", 2)[0][0], atol=1e-6)
    with pytest.raises(RefusalEditError, match="downstream direction needs the chosen candidate's layer"):
        resolve(EditSpec(direction="downstream"), DirectionBank(b.chosen, position=-1, mean_diff=b.mean_diff), 3)
    # Projected: orthogonal to the harmless mean at its layer.
    proj = resolve(EditSpec(projected=True), b, 3)
    hm = b.harmless_mean[-1, 2]
    assert abs(float(proj.at("attn", 0)[0][0] @ hm)) <= 1e-5 * float(hm.norm())
    # Interpolation between layers 1 and 2 at 1.25.
    interp = resolve(EditSpec(direction="interpolate", index=1.25), b, 3)
    a, c = b.mean_diff[-1, 1], b.mean_diff[-1, 2]
    expect = 0.75 * a / a.norm() + 0.25 * c / c.norm()
    assert torch.allclose(interp.at("attn", 1)[0][0], expect / expect.norm(), atol=1e-6)
    # Rank 3: orthonormal, led by the chosen direction.
    sub = resolve(EditSpec(rank=3), b, 3)
    q = sub.at("mlp", 2)[0]
    assert q.shape == (3, HIDDEN)
    assert torch.allclose(q @ q.T, torch.eye(3), atol=1e-5)
    assert torch.allclose(q[0], r, atol=1e-6)


def test_a_bank_from_candidates_is_the_one_extract_saves():
    """bench/confirm.py --cross-fit builds banks from part of the prompts: the same vectors as a saved bank."""
    from refusal_edit.activations import MeanActivations
    from refusal_edit.directions.bank import bank_from_candidates
    from refusal_edit.directions.candidates import CandidateSet

    shape = (2, 4, HIDDEN)
    harm = MeanActivations(torch.randn(shape), 6, torch.randn(shape), 3, torch.zeros(6))
    safe = MeanActivations(torch.randn(shape), 6, torch.randn(shape), 2, torch.zeros(6))
    cands = CandidateSet(harm.mean(True) - safe.mean(True), harm, safe, filtered=True)
    b = bank_from_candidates(cands, -1, 2)
    assert torch.equal(b.chosen, cands.vector(-1, 2)) and (b.position, b.layer) == (-1, 2)
    assert torch.equal(b.candidate(-2, 1), cands.vector(-2, 1))
    assert torch.allclose(b.harmless(-1, 2), (safe.sum_kept / 2)[1, 2].float())
    with pytest.raises(RefusalEditError, match="no candidate at position -3"):
        bank_from_candidates(cands, -3, 2)


def test_orthonormal_drops_dependent_rows():
    a, b = torch.randn(HIDDEN), torch.randn(HIDDEN)
    q = orthonormal(torch.stack([a, b, 2 * a - 3 * b]))
    assert q.shape == (2, HIDDEN)
    assert math.isclose(float(q[0] @ a / a.norm()), 1.0, rel_tol=1e-6)


def test_cli_variant_options_and_plan_only(tmp_path, cli):
    """`--layers A:B --weight W` is written like its spec; `--plan-only` shows the tensors and writes nothing."""
    import json

    from conftest import make_direction

    model = build("llama")
    src = save(model, tmp_path / "model")
    d = make_direction(tmp_path / "d.safetensors")
    res = cli("orthogonalize", src, "--direction", tmp_path / "d.safetensors", "--layers", "1:3", "--plan-only")
    assert res.code == 0, res.text
    assert "plan only" in res.out and "layers.1.self_attn.o_proj.weight" in res.out
    assert "layers.0.self_attn.o_proj.weight" not in res.out and "embed_tokens" not in res.out
    assert not list(tmp_path.glob("out*"))
    out = tmp_path / "out"
    res = cli(
        "orthogonalize",
        src,
        "--direction",
        tmp_path / "d.safetensors",
        "--layers",
        "1:3",
        "--weight",
        "0.5",
        "--out",
        out,
    )
    assert res.code == 0, res.text
    record = json.loads((out / "refusal_edit.json").read_text())
    assert record["mode"] == "spec" and record["spec"]["edit"]["attn"] == {
        "weight": 0.5,
        "start": 1,
        "stop": 3,
        "floor": 0.0,
    }
    edit = resolve(EditSpec.from_json(record["spec"]["edit"]), DirectionBank(d.mean_diff), 3)
    x = token_batch()
    with torch.no_grad(), edit_hooks(model, edit):
        reference = model(x).logits
    with torch.no_grad():
        assert (load(out)(x).logits - reference).abs().max().item() <= TOL
    res = cli("orthogonalize", src, "--direction", tmp_path / "d.safetensors", "--out", tmp_path / "o2", "--per-layer")
    assert res.code == 1 and "candidates.safetensors" in res.err and not (tmp_path / "o2").exists()
    res = cli("orthogonalize", src, "--direction", tmp_path / "d.safetensors", "--layers", "x", "--plan-only")
    assert res.code == 1 and "cannot read --layers 'x'" in res.err
