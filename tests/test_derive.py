"""Architectures derived from the model itself (issue 29): `refusal_edit.derive`.

- the derivation reproduces every hand-written table entry: on each table type's tiny model, the weight
  plan from the derived spec edits the same tensors, with the same layout and the same basis (sandwich
  gains included), as the table's, in memory and on the saved checkpoint;
- the named late-2026 families (Gemma 4, Qwen3.5 dense and MoE, Llama 4, GLM-4.7-Flash, MiniMax-M2,
  Nemotron-H, Kimi-Linear) are derived, verified and edited exactly through the CLI (bench/archs.py's path);
- verification is not circular: a spec that misses a writer, or names a non-writer, is rejected, with the site;
- a type outside the table is derived once, says so in one line, and is cached; an encoder-only type is
  refused with a reason; `refusal-edit archs` says that other decoder LMs are derived on first use.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from tiny import CONFIGS, build, save

import refusal_edit.arch as arch_module
import refusal_edit.derive as derive_module
from refusal_edit.arch import ARCHITECTURES, NO_TABLE_ENV, WriterSite
from refusal_edit.checkpoint.layout import open_checkpoint
from refusal_edit.derive import derive_and_verify, from_json, register, to_json
from refusal_edit.derive.build import derive
from refusal_edit.derive.verify import verify
from refusal_edit.edits.memory import ModelTensors
from refusal_edit.edits.plan import plan_ablation
from refusal_edit.errors import RefusalEditError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

TABLE = sorted(ARCHITECTURES)
pytestmark = pytest.mark.usefixtures("one_thread")
NAMED = ["gemma4", "qwen3_5", "qwen3_5_moe", "llama4", "glm4_moe_lite", "minimax_m2", "nemotron_h", "kimi_linear"]


@pytest.fixture
def registry(monkeypatch):
    """An empty registry of derived specs for the test (the process's own is restored afterwards)."""
    fresh: dict = {}
    monkeypatch.setattr(derive_module, "DERIVED", fresh)
    monkeypatch.setattr(arch_module, "RESOLVED", {})
    return fresh


def _plan(source, r):
    plan = plan_ablation(source, r)
    return {name: (type(t).__name__, t.q) for name, t in plan.transforms.items()}


def _same_plans(a: dict, b: dict) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    for name in a:
        assert a[name][0] == b[name][0], name
        assert torch.allclose(a[name][1], b[name][1], atol=1e-6), name


@pytest.mark.parametrize("model_type", TABLE)
def test_the_derivation_reproduces_the_table(model_type, tmp_path, monkeypatch, registry):
    model = build(model_type)
    spec, figures = derive_and_verify(model.config)
    assert max(figures.values()) <= 1e-4
    r = torch.randn(int(model.config.get_text_config().hidden_size), generator=torch.Generator().manual_seed(2))
    src = save(model, tmp_path / "model", with_tokenizer=False)
    table_memory, table_disk = _plan(ModelTensors(model), r), _plan(open_checkpoint(src), r)
    monkeypatch.setenv(NO_TABLE_ENV, "1")
    register(model.config, spec)
    _same_plans(_plan(ModelTensors(model), r), table_memory)
    _same_plans(_plan(open_checkpoint(src), r), table_disk)


@pytest.mark.parametrize("model_type", NAMED)
def test_named_families_are_derived_and_edited_exactly_through_the_cli(model_type, monkeypatch, registry):
    import archs

    monkeypatch.setenv(NO_TABLE_ENV, "1")
    row = archs.one(model_type)
    assert row["status"] == "exact", row
    assert row["diff"] <= 1e-4 and row["verify"] <= 1e-4
    types = [key.split("-")[0] for key in registry]  # the CLI found the spec derived from the default config:
    assert len(types) == len(set(types)), sorted(registry)  # the tiny checkpoint's config has the same key


def test_verification_rejects_a_missing_or_an_extra_writer():
    model = build("llama")
    derived = derive(model.config)
    spec = derived.spec
    missing = dataclasses.replace(
        spec, sites=(WriterSite("attn", ("self_attn",)), WriterSite("mlp", ("mlp",), optional=True))
    )
    missing = dataclasses.replace(missing, sites=(missing.sites[0], WriterSite("mlp", ())), tensors=spec.tensors)
    with pytest.raises(RefusalEditError, match="layer 0 has none of the mlp writers"):
        verify(missing, derived.model, derived.ids)
    no_mlp = dataclasses.replace(
        spec,
        sites=(spec.sites[0], WriterSite("mlp", (), optional=True)),
        tensors=tuple(t for t in spec.tensors if t.site != "mlp"),
    )
    with pytest.raises(RefusalEditError, match=r"r_left|differs"):
        verify(no_mlp, derived.model, derived.ids)
    extra = dataclasses.replace(spec, sites=(WriterSite("attn", ("self_attn", "input_layernorm")), spec.sites[1]))
    with pytest.raises(RefusalEditError, match="input_layernorm"):
        verify(extra, derived.model, derived.ids)


def test_a_type_outside_the_table_is_derived_once_and_cached(tmp_path, monkeypatch, cli, registry):
    monkeypatch.setenv("REFUSAL_EDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(NO_TABLE_ENV, "1")
    src = save(build("mistral"), tmp_path / "model", with_tokenizer=False)
    from conftest import make_direction

    make_direction(tmp_path / "d.safetensors")
    res = cli("orthogonalize", src, "--direction", tmp_path / "d.safetensors", "--out", tmp_path / "out")
    assert res.code == 0, res.text
    assert res.err.count("derived and verified") == 1
    cached = list((tmp_path / "cache" / "archs").glob("mistral-*.json"))
    assert len(cached) == 1
    spec = from_json(json.loads(cached[0].read_text()))
    assert to_json(spec) == json.loads(cached[0].read_text()) and spec.derived
    registry.clear()
    res = cli("orthogonalize", src, "--direction", tmp_path / "d.safetensors", "--out", tmp_path / "out2")
    assert res.code == 0 and "derived and verified" not in res.err  # read from the cache


def test_an_encoder_is_refused_with_a_reason(tmp_path, cli):
    odd = save(build("llama"), tmp_path / "odd", with_tokenizer=False)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "model_type": "t5"}))
    res = cli("archs", odd)
    assert res.code == 1 and "unsupported architecture 't5'" in res.err and "decoder language models" in res.err


def test_archs_says_other_decoder_lms_are_derived(cli):
    res = cli("archs")
    assert res.code == 0
    assert "derived and verified on first use" in " ".join(res.out.split())


assert set(TABLE) == set(CONFIGS)


def test_gemma4_moe_branches_and_per_layer_embeddings_get_their_own_norm_chains():
    """Gemma 4 with MoE and per-layer inputs: `post_ff(n1(mlp) + n2(experts))` and the per-layer projection
    through its own norm, each gain `w` (not 1 + w), measured on the norms themselves."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "gemma4_text", enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=64
    )
    spec, figures = derive_and_verify(config)
    assert max(figures.values()) <= 1e-4 and spec.norm_offset == 0.0
    mlp = spec.site("mlp")
    assert mlp.norms("mlp") == ("post_feedforward_layernorm_1", "post_feedforward_layernorm")
    assert mlp.norms("experts") == ("post_feedforward_layernorm_2", "post_feedforward_layernorm")
    assert mlp.norms("per_layer_projection") == ("post_per_layer_input_norm",)
    assert spec.site("attn").norms("self_attn") == ("post_attention_layernorm",)
    kinds = {r.pattern.split(r"\d+)\.")[-1]: r.kind for r in spec.tensors}
    assert kinds[r"experts\.down_proj"] == "experts" and spec.embed_scale.__name__ == "sqrt_hidden"


def test_shieldgemma2_is_exact_or_refused_never_silently_different():
    """transformers loads `shieldgemma2` with a key mapping meant for ShieldGemma2ForImageClassification
    (a `model.` prefix added to every key), so its image-text class does not load back its own checkpoint:
    every language-model weight comes back freshly initialised. Verified on the language model alone, the
    spec passed and the edit was silently off by ~1; the whole-wrapper check refuses it, naming the tensor."""
    from transformers import AutoConfig

    try:
        _, figures = derive_and_verify(AutoConfig.for_model("shieldgemma2"))
    except RefusalEditError as exc:
        assert "shieldgemma2" in str(exc) and "language_model" in str(exc) and "\n" not in str(exc)
        return
    assert figures["wrapper"] <= 1e-4 and figures["wrapper_r_left"] <= 1e-4, figures


def test_a_wrapper_that_passes_on_its_language_model_but_not_whole_is_refused(monkeypatch):
    """A wrapper whose checkpoint names one writer differently from its language model's (simulated: the
    plan misses layer 0's attention output only under the wrapper's `language_model` names) passes the
    language-model checks and must still be refused, naming where the edit goes wrong."""
    from transformers import AutoConfig

    import refusal_edit.edits.plan as plan_module

    real = plan_module.plan_ablation

    def renamed(ckpt, r, *args, **kwargs):
        plan = real(ckpt, r, *args, **kwargs)
        for name in [n for n in plan.transforms if re.search(r"language_model\..*layers\.0\.self_attn\.o_proj", n)]:
            del plan.transforms[name]
        return plan

    monkeypatch.setattr(plan_module, "plan_ablation", renamed)
    config = AutoConfig.for_model("llava")
    derived = derive(config)
    assert verify(derived.spec, derived.model, derived.ids)["checkpoint"] <= 1e-4  # the language model passes
    with pytest.raises(RefusalEditError, match=r"whole wrapper.*first at the output of layer 0"):
        derive_and_verify(config)


def test_configs_of_one_type_with_different_structure_never_share_a_spec(tmp_path, monkeypatch, registry):
    """A dense and an MoE config of one type (the difference only in a list of layer indices, which no flag
    shows) get their own derived spec, in this process and on disk; the same structure at another size
    (the shrunk twin the bench saves) shares it."""
    from transformers import AutoConfig

    from refusal_edit.arch import get_spec
    from refusal_edit.derive import resolve_spec, spec_key
    from refusal_edit.derive.shrink import shrunk

    monkeypatch.setenv("REFUSAL_EDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(NO_TABLE_ENV, "1")
    moe = AutoConfig.for_model("qwen3_moe", num_hidden_layers=2)
    dense = AutoConfig.for_model("qwen3_moe", num_hidden_layers=2, mlp_only_layers=[0, 1])
    assert spec_key(moe) != spec_key(dense) and spec_key(shrunk(moe)) == spec_key(moe)
    dense_spec, moe_spec = resolve_spec(dense), resolve_spec(moe)

    def experts(spec):
        return [r.pattern for r in spec.tensors if r.per_expert or r.kind.startswith("experts")]

    assert experts(moe_spec) and not experts(dense_spec)
    assert get_spec("qwen3_moe", dense) is dense_spec and get_spec("qwen3_moe", moe) is moe_spec
    assert len(list((tmp_path / "cache" / "archs").glob("qwen3_moe-*.json"))) == 2


def test_sweep_timeouts_end_in_seconds_exact_or_refused(monkeypatch):
    """The full sweep's two timeouts: BLT's config has no single layer stack (refused in one line, before any
    model is built), Phi-4-multimodal's audio encoder is a nested config now shrunk too (its tiny model is
    0.5M parameters, not 400M); a shrunk model that is still large is refused before it is allocated."""
    import time

    from transformers import AutoConfig

    import refusal_edit.derive.shrink as shrink

    start = time.perf_counter()
    with pytest.raises(RefusalEditError, match="blt config states no number of decoder layers"):
        derive_and_verify(AutoConfig.for_model("blt"))
    assert time.perf_counter() - start < 10
    small = shrink.shrunk(AutoConfig.for_model("phi4_multimodal"))
    with torch.device("meta"):
        count = sum(p.numel() for p in shrink.model_class(small)._from_config(small).parameters())
    assert count < 2_000_000, count
    monkeypatch.setattr(shrink, "MAX_PARAMS", 1000)
    with pytest.raises(RefusalEditError, match=r"shrunk llama config still builds \dM parameters"):
        shrink.tiny_model(AutoConfig.for_model("llama"))


@pytest.mark.parametrize("model_type", ["gemma", "granite"])
def test_baked_addition_on_a_derived_spec_is_exact_at_layer_0_and_refused_later(model_type, tmp_path, cli, monkeypatch):
    """A derived spec bakes `mode` add only into the embedding (layer 0, its scale a config formula: Gemma's
    sqrt(hidden), Granite's embedding_multiplier), equal to the independent reference's hook; at a later layer
    it refuses in one line (no bias route is derivable) and writes nothing."""
    import reference as ref
    from conftest import make_direction
    from tiny import load, token_batch

    monkeypatch.setenv("REFUSAL_EDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(NO_TABLE_ENV, "1")
    model = build(model_type)
    src = save(model, tmp_path / "model", with_tokenizer=False)
    d = make_direction(tmp_path / "d.safetensors")
    args = ["orthogonalize", src, "--direction", tmp_path / "d.safetensors", "--mode", "add", "--coeff", "1.5"]
    res = cli(*args, "--layer", "2", "--out", tmp_path / "later")
    assert res.code == 1 and not (tmp_path / "later").exists(), res.text
    line = res.err.strip().splitlines()[-1]  # after the one line saying the spec was derived
    assert line.startswith("error: cannot bake an addition at layer 2") and "writers are derived" in line
    res = cli(*args, "--layer", "0", "--out", tmp_path / "out")
    assert res.code == 0, res.text
    x = token_batch()
    with torch.no_grad(), ref.added(model, ref.FAMILIES[model_type], 1.5 * d.mean_diff, 0):
        reference = model(x).logits
    with torch.no_grad():
        original, logits = model(x).logits, load(tmp_path / "out")(x).logits
    assert (logits - reference).abs().max().item() <= 1e-4 < (logits - original).abs().max().item()
