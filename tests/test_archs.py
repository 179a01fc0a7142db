"""The architecture table against transformers and against itself (issue 12).

- every table entry has a tiny config, and `refusal-edit archs` lists them all on stdout;
- the stock class of each entry is the one transformers' auto classes pick;
- the supported-architectures table of docs/exactness.md is the table;
- transformers' own tensor-parallel plan (which marks residual writers `rowwise`) names nothing we miss;
- hooks (anatomy) and the weight plan find the same writers on every loaded model;
- an edit changes the writers and nothing else: a multimodal wrapper's vision tower and projector stay
  byte for byte;
- `archs MODEL` and `orthogonalize --plan-only` print the plan (on a hybrid, the writer each layer has) and
  write nothing; a baked addition on a layer without the route's target
  (a linear-attention layer) names the alternatives, and the hooked addition after attention adds exactly v
  whatever multiplier the attention output carries;
- extract -> orthogonalize -> evaluate runs end to end on the families added for issue 12.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import make_direction
from safetensors import safe_open
from tiny import CONFIGS, build, save

from refusal_edit.anatomy import anatomy
from refusal_edit.arch import ARCHITECTURES, classify, spec_for_config, supported, text_config
from refusal_edit.checkpoint.layout import open_checkpoint
from refusal_edit.edits.memory import ModelTensors
from refusal_edit.edits.plan import plan_ablation
from refusal_edit.edits.preview import preview_ablation

ARCHS = sorted(CONFIGS)
README = Path(__file__).resolve().parents[1] / "docs" / "exactness.md"  # the architectures table
# The families issue 12 added: each also runs the whole extract -> orthogonalize -> evaluate path.
ADDED = [
    "gpt_oss",
    "gemma3",
    "mistral3",
    "glm4_moe",
    "deepseek_v3",
    "qwen3_next",
    "smollm3",
    "olmo3",
    "cohere2",
    "exaone4",
    "seed_oss",
    "ernie4_5",
    "granitemoe",
    "phimoe",
    "glm4",
    "falcon_h1",
    "lfm2",
]
WRAPPERS = ("vision_tower.", "multi_modal_projector.")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and far faster on a shared machine (no OpenMP spin-waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_table_lists_at_least_27_types_each_with_a_tiny_config(cli):
    assert len(ARCHITECTURES) >= 27
    assert set(ARCHS) == set(ARCHITECTURES) and set(ADDED) <= set(ARCHS)
    res = cli("archs")
    assert res.code == 0, res.text
    listed = re.findall(r"^\W*([a-z0-9_]+) ", res.out, flags=re.MULTILINE)
    assert sorted(set(listed) & set(ARCHITECTURES)) == supported()
    assert f"supported architectures ({len(ARCHITECTURES)})" in res.out
    for spec in ARCHITECTURES.values():  # the stock class of each row is on its first line
        assert re.search(rf"^\W*{spec.model_type} .*{spec.stock_class[:10]}", res.out, flags=re.MULTILINE), spec


def test_stock_class_is_what_the_auto_classes_pick():
    """The class the exactness tests load with is transformers' own choice: AutoModelForCausalLM's, or for a
    multimodal wrapper that it lacks (Mistral 3) AutoModelForImageTextToText's."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    for model_type, spec in ARCHITECTURES.items():
        auto = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
        if auto is None and spec.text_model_type is not None:
            auto = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(model_type)
        assert auto == spec.stock_class, model_type


README_SECTION = "## Supported architectures"


def readme_table(text: str) -> list[tuple[str, str]]:
    """(model_type, stock class) of each row of the README's supported-architectures table."""
    start = text.index(README_SECTION + "\n")
    end = text.find("\n## ", start + len(README_SECTION))
    section = text[start : None if end < 0 else end]
    return re.findall(r"^\| `([a-z0-9_]+)` \|.*\| `(\w+)` \|$", section, flags=re.MULTILINE)


def test_readme_supported_list_is_the_table():
    text = README.read_text()
    assert README_SECTION + "\n" in text, f"README has no {README_SECTION!r} section"
    rows = readme_table(text)
    listed = [t for t, _ in rows]
    assert len(listed) == len(set(listed)), "a model type is listed twice"
    assert sorted(listed) == supported()
    assert all(ARCHITECTURES[t].stock_class == cls for t, cls in rows), rows
    assert f"{len(ARCHITECTURES)} model types" in text


def _rowwise(config) -> list[str]:
    """Module patterns transformers' tensor-parallel plan splits by rows: the ones that write into the stream."""
    plan = getattr(text_config(config), "base_model_tp_plan", None) or {}
    return [k for k, v in plan.items() if v == "embedding_rowwise" or v.split("_")[0] == "rowwise"]


NO_TP_PLAN = {"gpt2"}  # transformers 5.25 gives GPT-2 no base_model_tp_plan: nothing to cross-check


@pytest.mark.parametrize("model_type", ARCHS)
def test_every_rowwise_module_of_the_tp_plan_is_a_writer(model_type):
    model = build(model_type)
    spec = spec_for_config(model.config)
    names = [n for n, _ in model.named_parameters()]
    patterns = _rowwise(model.config)
    assert bool(patterns) == (model_type not in NO_TP_PLAN), f"{model_type}: the cross-check would not run"
    for pattern in patterns:
        rx = re.compile(r"(?:^|\.)" + re.escape(pattern).replace(r"\*", r"\d+") + r"(?:\.weight)?$")
        hits = [n for n in names if rx.search(n)]
        assert hits, f"{model_type}: no parameter of the tiny model matches the tp plan's {pattern}"
        for name in hits:
            assert classify(spec, name) is not None, f"{model_type}: {name} is rowwise in the tp plan, not a writer"


def _module_names(model) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


@pytest.mark.parametrize("model_type", ARCHS)
def test_hooks_and_the_weight_plan_find_the_same_writers(model_type):
    """Every tensor the weight edit changes sits in a module the hooks project, and every hooked module has
    one; the residual stream is read once per layer and once at the final norm."""
    model = build(model_type)
    anat = anatomy(model)
    names = _module_names(model)
    hooked = {names[id(w.module)] for w in anat.writers()}
    n_layers = int(text_config(model.config).num_hidden_layers)
    assert anat.num_layers == n_layers and len({(w.site, w.layer) for w in anat.writers()}) == 1 + 2 * n_layers
    plan = plan_ablation(ModelTensors(model), torch.ones(anat.hidden_size))
    edited = set(plan.transforms)
    for tensor in edited:
        assert any(tensor.startswith(h + ".") for h in hooked), f"{tensor} is edited but no hook projects it"
    for module in hooked:
        assert any(t.startswith(module + ".") for t in edited), f"{module} is hooked but none of its tensors is edited"
    assert not any(t.startswith(WRAPPERS) or ".vision_tower." in t for t in edited)

    calls: list[int] = []
    modules = [*anat.layers, anat.final_norm]
    handles = [m.register_forward_pre_hook(lambda _m, _a, i=i: calls.append(i)) for i, m in enumerate(modules)]
    try:
        with torch.no_grad():
            model(torch.tensor([[3, 4, 5, 6]]))
    finally:
        for h in handles:
            h.remove()
    assert calls == list(range(n_layers + 1))


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as fh:
            out |= {k: fh.get_tensor(k) for k in fh.keys()}
    return out


@pytest.mark.parametrize("model_type", ARCHS)
def test_an_edit_changes_the_writers_and_nothing_else(model_type, tmp_path, cli):
    src = save(build(model_type), tmp_path / "model", with_tokenizer=False)
    make_direction(tmp_path / "d.safetensors")
    res = cli("orthogonalize", src, "--direction", tmp_path / "d.safetensors", "--out", tmp_path / "out")
    assert res.code == 0, res.text
    before, after = _tensors(src), _tensors(tmp_path / "out")
    spec = spec_for_config(json.loads((src / "config.json").read_text()))
    created = set(after) - set(before)
    assert not set(before) - set(after)
    assert created <= {n for n in after if n.endswith(spec.lm_head)}  # an untied head, nothing else
    changed = {n for n in before if not torch.equal(before[n].view(torch.uint8), after[n].view(torch.uint8))}
    writers = {n for n in before if classify(spec, n) is not None}
    assert changed and changed <= writers
    assert all(n in changed for n in writers if n.endswith(".weight") or n.endswith("down_proj"))
    if spec.text_model_type is not None:  # multimodal: vision tower and projector byte for byte
        kept = [n for n in before if n.startswith(WRAPPERS)]
        assert kept and not set(kept) & changed


def test_archs_model_prints_every_planned_tensor_and_writes_nothing(tmp_path, cli):
    src = save(build("gemma3"), tmp_path / "model")
    listing = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    res = cli("archs", src)
    assert res.code == 0, res.text
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == listing
    _, rows = preview_ablation(open_checkpoint(src))
    out = res.out
    assert "gemma3 (Gemma3ForConditionalGeneration)" in out
    assert len(rows) == 1 + 2 * 3 + 1  # embedding, o_proj and down_proj per layer, the untied head
    for row in rows:
        assert row.name in out
    assert not any("vision_tower" in r.name for r in rows)
    assert out.count("post_attention_layernorm") == 3 and out.count("post_feedforward_layernorm") == 3
    head = next(r for r in rows if r.kind == "new")
    assert head.name == "lm_head.weight" and head.note == "copy of language_model.model.embed_tokens.weight"
    assert "7 tensors edited (1 embedding, 6 linear), 1 created" in out
    assert "untied embeddings" in res.err

    go = save(build("gpt_oss"), tmp_path / "gpt_oss", with_tokenizer=False)
    res = cli("archs", go)
    assert res.code == 0, res.text
    lines = [line for line in res.out.splitlines() if "mlp.experts.down_proj " in line]
    assert len(lines) == 3 and all("orthogonalize rows" in line and "4x32x32" in line for line in lines)
    assert "3 experts_bias" in res.out and "3 experts_t" in res.out

    odd = save(build("llama"), tmp_path / "odd", with_tokenizer=False)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    res = cli("archs", tmp_path / "odd")
    assert res.code == 1 and "unsupported architecture 'bert'" in res.err


def test_plan_only_lists_the_writer_each_hybrid_layer_has(tmp_path, cli):
    """`orthogonalize --plan-only` on Qwen3-Next: gated-delta-net `out_proj` on linear-attention layers, `o_proj`
    on the full-attention one, every routed and shared expert; results on stdout, nothing written."""
    src = save(build("qwen3_next"), tmp_path / "model", with_tokenizer=False)
    make_direction(tmp_path / "d.safetensors")
    res = cli("orthogonalize", src, "--direction", tmp_path / "d.safetensors", "--plan-only")
    assert res.code == 0, res.text
    out = res.out
    for layer in (0, 2):
        assert f"model.layers.{layer}.linear_attn.out_proj.weight" in out
        assert f"model.layers.{layer}.self_attn" not in out
    assert "model.layers.1.self_attn.o_proj.weight" in out and "model.layers.1.linear_attn" not in out
    experts = set(re.findall(r"model\.layers\.(\d)\.mlp\.experts\.(\d)\.down_proj\.weight", out))
    assert experts == {(str(layer), str(e)) for layer in (0, 1) for e in range(4)}  # layer 2 is dense (mlp_only)
    assert "model.layers.2.mlp.down_proj.weight" in out and "mlp.shared_expert.down_proj.weight" in out
    assert "plan only, nothing written" in out and sorted(p.name for p in tmp_path.iterdir()) == [
        "d.safetensors",
        "model",
    ]


def test_a_baked_addition_after_a_linear_attention_layer_names_the_alternatives(tmp_path, cli):
    src = save(build("qwen3_next"), tmp_path / "model", with_tokenizer=False)
    make_direction(tmp_path / "d.safetensors")
    args = ["orthogonalize", src, "--direction", tmp_path / "d.safetensors", "--mode", "add", "--site", "attn"]
    res = cli(*args, "--layer", "0", "--out", tmp_path / "o0")  # layer 0 is a gated-delta-net layer
    assert res.code == 1 and "layer 0 has no self_attn.o_proj" in res.err and "alternatives" in res.err
    assert not (tmp_path / "o0").exists()
    res = cli(*args, "--layer", "1", "--out", tmp_path / "o1")  # full attention: the flag creates the biases
    assert res.code == 0, res.text
    names = set(_tensors(tmp_path / "o1"))
    assert "model.layers.1.self_attn.o_proj.bias" in names
    assert not any(n.startswith("model.layers.0.self_attn") for n in names)


@pytest.mark.parametrize(
    ("model_type", "mlp_norm"),
    [
        ("granite", "post_attention_layernorm"),  # residual multiplier
        ("granitemoe", "post_attention_layernorm"),
        ("falcon_h1", "pre_ff_layernorm"),  # attention output multiplier, Mamba in parallel
        ("qwen3_next", "post_attention_layernorm"),  # layer 1 is a full-attention layer
        ("lfm2", "ffn_norm"),
    ],
)
def test_hooked_addition_after_attention_adds_exactly_the_vector(model_type, mlp_norm):
    """`addition(site="attn")` adds v to the residual stream right after layer 1's attention: the input of
    its pre-MLP norm moves by exactly v, whatever multiplier the attention output carries."""
    from refusal_edit.interventions import addition

    model = build(model_type)
    norm = anatomy(model).layers[1].get_submodule(mlp_norm)
    seen: list[torch.Tensor] = []
    handle = norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    v = torch.randn(anatomy(model).hidden_size, generator=torch.Generator().manual_seed(4))
    x = torch.tensor([[3, 4, 5, 6, 7]])
    try:
        with torch.no_grad():
            model(x)
            with addition(model, v, layer=1, coeff=1.0, site="attn"):
                model(x)
    finally:
        handle.remove()
    assert torch.allclose(seen[1] - seen[0], v.expand_as(seen[0]), atol=1e-5)


FAST = ["--n-train", "4", "--n-val", "4", "--batch-size", "8", "--top-k", "1"]
PERMISSIVE = ["--kl-threshold", "1e9", "--induce-threshold", "-1e9", "--refusal-tokens", "i,as"]


@pytest.fixture
def no_plots(monkeypatch):
    """The score and report plots do not depend on the architecture (tested with the commands) and cost more
    than the tiny model's whole run: write an empty file in their place."""

    def empty(*args):
        path = next(a for a in args if isinstance(a, Path))
        path.write_bytes(b"")
        return path

    monkeypatch.setattr("refusal_edit.directions.plot.plot_scores", empty)
    monkeypatch.setattr("refusal_edit.evaluation.report.plot_report", empty)


@pytest.mark.parametrize("model_type", ADDED)
def test_extract_orthogonalize_evaluate_end_to_end(model_type, tiny_dir, tmp_path, cli, no_plots):
    src = tiny_dir(model_type)
    res = cli("extract", src, "--out", tmp_path / "run", *FAST, *PERMISSIVE)
    assert res.code == 0, res.text
    direction = tmp_path / "run" / "direction.safetensors"
    res = cli("orthogonalize", src, "--direction", direction, "--out", tmp_path / "edited")
    assert res.code == 0, res.text
    prompts = ["--n-test", "2", "--max-new-tokens", "2", "--samples", "0", "--batch-size", "4"]
    res = cli("evaluate", src, tmp_path / "edited", *prompts, "--out", tmp_path / "report", "--json")
    assert res.code == 0, res.text
    report = json.loads(res.out)
    kl = report["divergence"]["first_token_kl"]
    assert kl > 0 and math.isfinite(kl)  # the edit changed the model, and finitely
    assert report["refusal"]["base"]["harmful"]["total"] == 2
    assert (tmp_path / "report" / "report.json").exists()
