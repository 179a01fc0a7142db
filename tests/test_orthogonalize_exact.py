"""Exactness of the weight edit on every supported architecture (the product's core promise).

For each architecture a tiny random model (norms and biases perturbed) is edited through the CLI, loaded
with its stock transformers class (the wrapper's own class for multimodal models), and compared in
float32 against the *original* model under tests/reference.py: hooks written from the transformers modeling
code that project the direction off every write into the residual stream (behind a sandwich norm, off the
norm's input against normalize(g * r), g measured from the norm module). The reference shares no code with
the edit; the product's own hook twins (`ablation`, `addition`) are checked against it too.
"""

from __future__ import annotations

import json

import pytest
import reference as ref
import torch
from conftest import make_direction
from tiny import CONFIGS, build, load, save, token_batch

from refusal_edit.arch import ARCHITECTURES
from refusal_edit.interventions import ablation, addition

ARCHS = sorted(CONFIGS)
TOL = 1e-4


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and far faster on a shared machine (no OpenMP spin-waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_table_entry_is_tested():
    assert set(ARCHS) == set(ARCHITECTURES) == set(ref.FAMILIES)


@pytest.mark.parametrize("model_type", ARCHS)
def test_ablation_matches_hooked_original(model_type, tmp_path, cli):
    model = build(model_type)
    src = save(model, tmp_path / "model")
    d = make_direction(tmp_path / "direction.safetensors")
    x = token_batch()
    rows, basis = ref.FAMILIES[model_type], ref.uniform(d.direction)
    with torch.no_grad(), ref.projected(model, rows, basis):
        reference = model(x).logits
    with torch.no_grad(), ablation(model, d.direction):
        hooked = model(x).logits
    with torch.no_grad():
        original = model(x).logits

    res = cli("orthogonalize", src, "--direction", tmp_path / "direction.safetensors", "--out", tmp_path / "out")
    assert res.code == 0, res.text
    edited = load(tmp_path / "out")
    logits = ref.assert_removed(edited, rows, x, basis, TOL).logits  # nothing along r in any write or state

    assert (logits - reference).abs().max().item() <= TOL
    assert (hooked - reference).abs().max().item() <= TOL  # the product's hook twin is the same edit
    assert (logits - original).abs().max().item() > 1e-2  # the edit really changed the model
    # Architectures whose output head is tied are untied: the original matrix becomes the head.
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    if model.config.tie_word_embeddings:
        assert cfg["tie_word_embeddings"] is False
        assert torch.equal(edited.get_output_embeddings().weight, model.get_input_embeddings().weight)


ADD_CASES = [(t, layer, site) for t in ARCHS for layer, site in ((0, "input"), (2, "input"), (1, "attn"))]


def routes(model_type: str, site: str) -> bool:
    return any(r.site == site for r in ARCHITECTURES[model_type].bias_routes)


@pytest.mark.parametrize(("model_type", "layer", "site"), ADD_CASES)
def test_add_matches_hooked_original_or_says_why_not(model_type, layer, site, tmp_path, cli):
    model = build(model_type)
    src = save(model, tmp_path / "model")
    d = make_direction(tmp_path / "direction.safetensors")
    out = tmp_path / "out"
    args = ["orthogonalize", src, "--direction", tmp_path / "direction.safetensors", "--out", out]
    res = cli(*args, "--mode", "add", "--coeff", "1.5", "--layer", str(layer), "--site", site)
    supported = (layer == 0 and site == "input") or routes(model_type, site)
    if not supported:
        assert res.code == 1
        assert "cannot bake an addition" in res.err and "alternatives" in res.err
        assert not out.exists()
        return
    assert res.code == 0, res.text
    x = token_batch()
    with torch.no_grad(), ref.added(model, ref.FAMILIES[model_type], 1.5 * d.mean_diff, layer, site):
        reference = model(x).logits
    with torch.no_grad(), addition(model, d.mean_diff, layer, coeff=1.5, site=site):
        hooked = model(x).logits
    with torch.no_grad():
        original = model(x).logits
        logits = load(out)(x).logits
    assert (logits - reference).abs().max().item() <= TOL
    assert (hooked - reference).abs().max().item() <= TOL
    assert (logits - original).abs().max().item() > 1e-2


def test_relabelled_qwen2_is_llama_with_explicit_zero_biases(tmp_path, cli):
    src = save(build("qwen2"), tmp_path / "model")
    make_direction(tmp_path / "d.safetensors")
    res = cli("orthogonalize", src, "--direction", tmp_path / "d.safetensors", "--out", tmp_path / "o", "--mode", "add")
    assert res.code == 0, res.text
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["mlp_bias"] is True and cfg["attention_bias"] is True
    from safetensors import safe_open

    with safe_open(str(tmp_path / "o" / "model.safetensors"), "pt") as fh:
        names = set(fh.keys())
        assert torch.count_nonzero(fh.get_tensor("model.layers.0.self_attn.o_proj.bias")) == 0
        assert torch.count_nonzero(fh.get_tensor("model.layers.0.mlp.gate_proj.bias")) == 0
        assert torch.count_nonzero(fh.get_tensor("model.layers.1.mlp.down_proj.bias")) > 0  # layer 2 input
    for layer in range(3):
        for m in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            assert f"model.layers.{layer}.{m}.bias" in names
