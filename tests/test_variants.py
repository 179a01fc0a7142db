"""Edit variants (issue 11): partial per-layer strengths, per-layer and interpolated directions, projected
directions, rank-k subspaces and exact norm preservation, on every supported architecture.

Variants with a hook twin are written as checkpoints, loaded with stock transformers and compared with
the original model under tests/reference.py's hooks (float32, <= 1e-4), with each variant's bases and weights
written out here from its definition (`DEFINITIONS`): nothing is shared with the edit, neither the resolved
spec nor the architecture table, anatomy or linalg. The product's hook twin (`edit_hooks`) and in-memory edit
are checked against the same reference. Norm preservation has no twin: it is checked by its invariants (no
component left along the basis, every written vector keeps its norm) and against a dense float64 reference
(the gain measured from the model's own norm module).
"""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch
from tiny import CONFIGS, HIDDEN, build, load, save, token_batch

from refusal_edit.checkpoint.layout import open_checkpoint
from refusal_edit.edits.memory import edited_weights
from refusal_edit.edits.plan import plan_edit
from refusal_edit.edits.spec import DirectionBank, EditSpec, Strength, resolve
from refusal_edit.edits.write import write_checkpoint
from refusal_edit.errors import RefusalEditError
from refusal_edit.interventions import edit_hooks
from refusal_edit.linalg import orthonormal

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


def _unit(v: torch.Tensor) -> torch.Tensor:
    v = v.double()
    return v / v.norm()


def _off(r: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """r without its component along the harmless mean (projected abliteration)."""
    m = _unit(mean)
    return _unit(r - (r @ m) * m)


def definition(variant: str, b: DirectionBank) -> ref.Basis:
    """Each variant's bases and weights, written out from the definitions (spec.py's docstrings) for the bank
    above: the chosen candidate is position -1, stream 2; the writers of layer l write into stream l + 1."""
    md, hm = b.mean_diff[-1].double(), b.harmless_mean[-1].double()  # position -1: [stream, H]
    weights: dict[str, list[float]]
    if variant == "kernel":  # per-layer candidates off the harmless mean; attn kernel 0.9 at 1, width 1.5, floor 0.2
        rows = {s: _off(_unit(md[s]), hm[s])[None] for s in range(1, 4)}
        rows[0] = _off(_unit(md[2]), hm[2])[None]  # the embedding: the chosen candidate
        weights = {"attn": [0.2 + 0.7 / 3, 0.9, 0.2 + 0.7 / 3], "mlp": [0.3, 1.0, 0.6], "embedding": [0.5]}
    elif variant == "subspace":  # 0.6 x layer 1 + 0.4 x layer 2, with layer 1's other two positions
        lead = 0.6 * _unit(md[1]) + 0.4 * _unit(md[2])
        rows = dict.fromkeys(range(4), torch.stack([lead, b.mean_diff[0, 1].double(), b.mean_diff[1, 1].double()]))
        weights = {"attn": [1.0] * 3, "mlp": [0.7] * 3, "embedding": [1.0]}
    elif variant == "full-layerwise":  # stream s: its candidate off the harmless mean, plus its lower neighbour
        rows = {s: torch.stack([_off(_unit(md[s]), hm[s]), md[s - 1]]) for s in range(1, 4)}
        rows[0] = torch.stack([_off(_unit(md[2]), hm[2]), md[1]])  # the embedding: the chosen one, layer 1 nearest
        weights = {"attn": [1.0] * 3, "mlp": [1.0] * 3, "embedding": [1.0]}
    else:  # downstream: the chosen direction up to stream 2, stream 3's own candidate; attn 1.1 at 1.5, width 2
        rows = {0: md[2][None], 1: md[2][None], 2: md[2][None], 3: md[3][None]}
        weights = {"attn": [0.95, 1.05, 1.05], "mlp": [0.5] * 3, "embedding": [0.7]}

    def basis(site: str, layer: int | None) -> tuple[torch.Tensor, float]:
        if layer is None:
            return rows[0], weights["embedding"][0]
        return rows[layer + 1], weights[site][layer]

    return basis


def write_edit(src, out, spec: EditSpec, b: DirectionBank):
    ckpt = open_checkpoint(src)
    text = ckpt.config.get("text_config") or ckpt.config
    n_layers = int(text.get("num_hidden_layers") or text.get("n_layer"))
    plan = plan_edit(ckpt, resolve(spec, b, n_layers))
    write_checkpoint(ckpt, plan, out)
    return load(out)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("model_type", ARCHS)
def test_variant_checkpoint_equals_its_hook_twin(model_type, variant, tmp_path):
    model = build(model_type)
    src = save(model, tmp_path / "model", with_tokenizer=False)
    spec, b = VARIANTS[variant], bank()
    rows, basis = ref.FAMILIES[model_type], definition(variant, b)
    x = token_batch()
    with torch.no_grad(), ref.projected(model, rows, basis):
        reference = model(x).logits
    with torch.no_grad():
        original = model(x).logits
    edited = write_edit(src, tmp_path / "out", spec, b)
    logits = ref.assert_removed(edited, rows, x, basis, TOL).logits  # weight-1 writes keep nothing of their basis
    assert (logits - reference).abs().max().item() <= TOL
    assert (logits - original).abs().max().item() > 1e-2
    # The product's hook twin and its in-memory weight edit (what tune uses) are the same edit.
    edit = resolve(spec, b, model.config.get_text_config().num_hidden_layers)
    with torch.no_grad(), edit_hooks(model, edit):
        assert (model(x).logits - reference).abs().max().item() <= TOL
    with torch.no_grad(), edited_weights(model, edit):
        assert (model(x).logits - reference).abs().max().item() <= TOL
    with torch.no_grad():
        assert torch.equal(model(x).logits, original)  # restored


def norm_preserving(param: torch.Tensor, q: torch.Tensor, alpha: float) -> list[torch.Tensor]:
    """The definition, in float64, along each axis of the residual's size: every written vector (a slice along
    that axis) loses alpha x its part in span(q) and is scaled back to its norm (a vector with nothing left
    stays as it is). One candidate per axis: the layout (rows, columns, either expert layout) is not assumed."""
    hidden = q.shape[1]
    out = []
    for axis in [a for a, n in enumerate(param.shape) if n == hidden]:
        vecs = param.detach().double().movedim(axis, -1)
        new = vecs - alpha * (vecs @ q.T) @ q
        old_norm, new_norm = vecs.norm(dim=-1, keepdim=True), new.norm(dim=-1, keepdim=True)
        new = torch.where(new_norm > 0, new * old_norm / new_norm.clamp_min(1e-300), new)
        out.append(new.movedim(-1, axis))
    return out


def norm_definition(b: DirectionBank) -> ref.Basis:
    """direction "layer", rank 2 over positions: stream s's own candidate, then the larger of its other two."""
    md = b.mean_diff.double()

    def rows(s: int) -> torch.Tensor:
        return torch.stack([md[-1, s], max(md[0, s], md[1, s], key=lambda v: float(v.norm()))])

    return lambda _site, layer: (rows(2 if layer is None else layer + 1), 1.0)


@pytest.mark.parametrize("model_type", ARCHS)
def test_norm_preservation_invariants_and_dense_reference(model_type, tmp_path):
    model = build(model_type)
    src = save(model, tmp_path / "model", with_tokenizer=False)
    b = bank()
    spec = EditSpec(direction="layer", rank=2, preserve_norm=True)
    edited = write_edit(src, tmp_path / "out", spec, b)
    rows, basis = ref.FAMILIES[model_type], norm_definition(b)
    located = ref.locate(model, rows)
    before, after = dict(model.named_parameters()), dict(edited.named_parameters())
    changed = [n for n, w in before.items() if not torch.equal(w, after[n])]
    writers = {n: e for e in located.writers for n, _ in e.module.named_parameters(prefix=e.path)}
    for name in changed:
        assert name in writers, f"{name} changed but is not inside a module that writes into the residual stream"
        e = writers[name]
        vecs, alpha = basis(e.site, e.layer)
        q = ref.gain_basis(located, e.site, e.layer, vecs)
        got = after[name].detach().double()
        gap = min((got - want).abs().max().item() / max(1.0, want.abs().max().item()) for want in
                  norm_preserving(before[name], q, alpha))  # fmt: skip
        assert gap <= 1e-5, name
    assert len(changed) >= 7  # embedding + 2 writers x 3 layers at least
    # Invariants: nothing along each basis reaches the stream; the embedding keeps its row norms.
    x = token_batch()
    ref.assert_removed(edited, rows, x, basis, TOL)
    emb = edited.get_input_embeddings().weight.detach()
    orig = model.get_input_embeddings().weight.detach()
    rel = (emb.norm(dim=1) - orig.norm(dim=1)).abs() / orig.norm(dim=1).clamp_min(1e-12)
    assert rel.max().item() <= 1e-5
    # Without a hook twin, hooks refuse; the in-memory weight edit equals the written checkpoint.
    edit = resolve(spec, b, model.config.get_text_config().num_hidden_layers)
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
    assert record["mode"] == "ablate" and record["spec"]["edit"]["attn"] == {
        "weight": 0.5,
        "start": 1,
        "stop": 3,
        "floor": 0.0,
    }
    x = token_batch()  # layers 1 and 2 at weight 0.5; layer 0 and the embedding untouched
    half = ref.uniform(d.mean_diff, 0.5)
    with (
        torch.no_grad(),
        ref.projected(model, ref.FAMILIES["llama"], lambda s, i: half(s, i) if i else (d.mean_diff, 0)),
    ):
        reference = model(x).logits
    with torch.no_grad():
        assert (load(out)(x).logits - reference).abs().max().item() <= TOL
    res = cli("orthogonalize", src, "--direction", tmp_path / "d.safetensors", "--out", tmp_path / "o2", "--per-layer")
    assert res.code == 1 and "candidates.safetensors" in res.err and not (tmp_path / "o2").exists()
    res = cli("orthogonalize", src, "--direction", tmp_path / "d.safetensors", "--layers", "x", "--plan-only")
    assert res.code == 1 and "cannot read --layers 'x'" in res.err


def test_one_edit_value_describes_ablation_variants_and_the_addition():
    """`EditSpec` is the edit of every path: an ablation's JSON is what fronts and records always held (no
    addition keys), an addition round-trips with its options, and options of the other mode are errors."""
    assert set(EditSpec().to_json()) == set(EditSpec.__dataclass_fields__) - {"mode", "coeff", "layer", "site", "unit"}
    add = EditSpec(mode="add", coeff=-2.0, layer=1, site="attn", unit=True).check()
    assert add.to_json()["mode"] == "add" and EditSpec.from_json(add.to_json()) == add and not add.is_variant
    assert EditSpec(rank=2).is_variant and not EditSpec().is_variant
    with pytest.raises(RefusalEditError, match="`coeff` and `layer` apply to `mode` add"):
        EditSpec(coeff=2.0, layer=1).check()
    with pytest.raises(RefusalEditError, match="ablation variant; it does not combine with `mode` add"):
        EditSpec(mode="add", rank=2).check()
    with pytest.raises(RefusalEditError, match="unknown `site`"):
        EditSpec(mode="add", site="mlp").check()
