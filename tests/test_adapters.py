"""The edit as a PEFT LoRA adapter: base + adapter loaded with stock PEFT equals the edited checkpoint and the
hooked original (fp32, <= 1e-4) on every tiny architecture PEFT can express; what it cannot is a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_direction
from tiny import CONFIGS, build, load, save, token_batch

from refusal_edit.arch import ARCHITECTURES
from refusal_edit.interventions import ablation

peft = pytest.importorskip("peft")

TOL = 1e-4
# What PEFT's LoRA cannot carry, by architecture (the tiny configs): residual biases (no lora_bias for embeddings),
# what PEFT itself refuses to wrap. Every other table entry (fused experts included, through PEFT's
# target_parameters) must be carried exactly.
BIASES = {"llama", "qwen3", "gpt2", "gpt_neox", "smollm3", "seed_oss", "phimoe", "gpt_oss", "qwen3_moe"}
REFUSED = {t: "residual biases" for t in BIASES}
REFUSED["falcon_h1"] = "incompatible with Mamba"  # PEFT's own check: no LoRA on a Mamba mixer's out_proj
# PEFT 0.21 rewrites every *.down_proj target of these MoE types into the fused experts when loading (its conversion
# of transformers-4 adapters): their dense / shared-expert down_proj would keep its weights, so the writer refuses.
# PEFT 0.22 no longer does: then the adapter must be written and exact. Which one happens is PEFT's, found by the
# writer's own injection check; never an adapter that leaves a writer unedited.
REWRITTEN = {"glm4_moe", "deepseek_v3", "qwen3_next"}
ARCHS = sorted(CONFIGS)


def with_adapter(model, folder):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(folder)).eval()


@pytest.mark.parametrize("model_type", ARCHS)
def test_peft_adapter_equals_checkpoint_and_hooks(model_type, tmp_path, cli):
    model = build(model_type)
    src = save(model, tmp_path / "model")
    d = make_direction(tmp_path / "d.safetensors")
    x = token_batch()
    args = ["orthogonalize", src, "--direction", tmp_path / "d.safetensors"]
    res = cli(*args, "--format", "peft", "--out", tmp_path / "adapter")
    refused = REFUSED.get(model_type)
    if model_type in REWRITTEN and res.code == 1:
        refused = "rewrites the targets"
    if refused is not None:
        assert res.code == 1, res.text
        assert refused in res.err and "write a checkpoint" in res.err
        assert not (tmp_path / "adapter").exists()
        return
    assert res.code == 0, res.text
    assert cli(*args, "--out", tmp_path / "edited").code == 0
    with torch.no_grad(), ablation(model, d.direction):
        hooked = model(x).logits
    with torch.no_grad():
        edited = load(tmp_path / "edited")(x).logits
        adapted = with_adapter(load(src), tmp_path / "adapter")
        logits = adapted(x).logits
    assert (logits - hooked).abs().max().item() <= TOL
    assert (logits - edited).abs().max().item() <= TOL
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == config["r"] == 1
    # merge_and_unload reproduces our checkpoint, tensor by tensor; a tied head shares the merged embedding (PEFT
    # merges into the one matrix), so it is the one tensor that differs: the adapter's docstring says so
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    merged = adapted.merge_and_unload().state_dict()
    ours = load(tmp_path / "edited").state_dict()
    checked = [name for name in merged if name in ours and not (tied and name.startswith("lm_head"))]
    assert len(checked) >= len(ours) - 1
    for name in checked:
        assert (merged[name] - ours[name]).abs().max().item() <= TOL, name


def test_every_table_entry_is_covered():
    assert set(ARCHS) == set(ARCHITECTURES)


# ------------------------------------------------------------------------------------------ llama.cpp LoRA GGUF


def _ggml_delta(name: str, a, b, alpha: float):
    """The change llama.cpp applies for one lora_a / lora_b pair, in HF orientation (llama-graph.cpp's formulas,
    restated): a matrix gets b @ a; token_embd's row t gets b @ a[t]; fused experts b[e] @ a[e]; scale alpha / r."""
    import numpy as np

    rank = b.shape[-1]
    scale = alpha / rank
    if name == "token_embd.weight":
        return scale * (a @ b.T)
    if a.ndim == 3:
        return scale * np.einsum("ehr,eri->ehi", b, a)
    return scale * (b @ a)


@pytest.mark.parametrize(
    ("arch", "moe"), [("qwen2", False), ("gemma2", False), ("qwen2moe", True)], ids=["qwen2", "gemma2", "moe"]
)
def test_gguf_lora_is_the_edit_of_the_dequantized_base(arch, moe, tmp_path):
    """Every pair, applied by llama.cpp's formula to the dequantized base tensor, gives exactly what the plan's
    transform makes of it (the edited GGUF before requantization); metadata as llama.cpp requires."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf_tiny import HIDDEN, write_tiny

    from refusal_edit.directions.artifacts import save_direction
    from refusal_edit.edits.ops import apply_whole
    from refusal_edit.gguf import quants
    from refusal_edit.gguf.file import GGUFFile
    from refusal_edit.gguf.hf_view import GGUFSource
    from refusal_edit.workflows.gguf import orthogonalize_gguf

    torch.manual_seed(0)
    save_direction(tmp_path / "d.safetensors", torch.randn(HIDDEN), {"layer": 1, "position": -1, "model": "tiny"})
    base = write_tiny(tmp_path / "m.gguf", arch, ffn_type=[Q.Q4_K, Q.Q6_K], moe=moe)
    result = orthogonalize_gguf(base, tmp_path / "d.safetensors", tmp_path / "lora.gguf", format="gguf-lora")
    lora = GGUFFile(tmp_path / "lora.gguf")
    assert lora.arch == GGUFFile(base).arch
    assert lora.value("general.type") == "adapter" and lora.value("adapter.type") == "lora"
    source = GGUFSource(base)
    plan = result.plan
    alpha = lora.value("adapter.lora.alpha")
    assert len(lora.tensors) == 2 * len(plan.transforms)
    for hf, transform in plan.transforms.items():
        name = source.gguf_of[hf]
        ta, tb = lora.tensors[f"{name}.lora_a"], lora.tensors[f"{name}.lora_b"]
        base_t = source.gguf.tensors[name]
        if name == "token_embd.weight":  # flipped: a ne [r, V], b ne [r, H]
            assert ta.ne[1] == base_t.ne[1] and tb.ne[1] == base_t.ne[0]
        else:  # a ne [in, r, (E)], b ne [r, out, (E)]
            assert ta.ne[0] == base_t.ne[0] and tb.ne[1] == base_t.ne[1] and ta.ne[1] == tb.ne[0]
        a = lora.rows(ta, 0, ta.n_rows).view(np.float32).reshape(ta.hf_shape)
        b = lora.rows(tb, 0, tb.n_rows).view(np.float32).reshape(tb.hf_shape)
        w = quants.dequantize(source.gguf.rows(base_t, 0, base_t.n_rows), base_t.qtype, base_t.row_size)
        w = torch.from_numpy(np.array(w, dtype=np.float32).reshape(base_t.hf_shape))
        expected = apply_whole(transform, w.clone())
        got = w + torch.from_numpy(_ggml_delta(name, a, b, alpha))
        assert (got - expected).abs().max().item() <= 1e-5, name
    assert result.record.format == "gguf-lora"


def test_gguf_lora_refuses_a_tied_head(tmp_path):
    """llama.cpp looks adapters up by tensor name: a tied head (token_embd reused) would get the embedding's pair."""
    from gguf_tiny import HIDDEN, write_tiny

    from refusal_edit.directions.artifacts import save_direction
    from refusal_edit.errors import RefusalEditError
    from refusal_edit.workflows.gguf import orthogonalize_gguf

    save_direction(tmp_path / "d.safetensors", torch.randn(HIDDEN), {"layer": 1, "position": -1, "model": "tiny"})
    base = write_tiny(tmp_path / "m.gguf", "qwen2", tied=True)
    with pytest.raises(RefusalEditError, match="ties its output head"):
        orthogonalize_gguf(base, tmp_path / "d.safetensors", tmp_path / "lora.gguf", format="gguf-lora")
    assert not (tmp_path / "lora.gguf").exists()


def test_edited_gguf_names_itself_a_derivative(tmp_path):
    """general.name / finetune / tags / base_model.* say what the file is and what it came from (ggml's keys);
    the default file name follows ggml's naming convention."""
    from gguf_tiny import HIDDEN, write_tiny

    from refusal_edit.directions.artifacts import save_direction
    from refusal_edit.gguf.file import GGUFFile
    from refusal_edit.gguf.metadata import default_name
    from refusal_edit.workflows.gguf import orthogonalize_gguf

    save_direction(tmp_path / "d.safetensors", torch.randn(HIDDEN), {"layer": 1, "position": -1, "model": "tiny"})
    base = write_tiny(tmp_path / "m.gguf", "qwen2")
    orthogonalize_gguf(base, tmp_path / "d.safetensors", tmp_path / "e.gguf", base_model="org/tiny-qwen2")
    orthogonalize_gguf(base, tmp_path / "d.safetensors", tmp_path / "l.gguf", format="gguf-lora")
    edited, lora = GGUFFile(tmp_path / "e.gguf"), GGUFFile(tmp_path / "l.gguf")
    assert edited.value("general.name") == "tiny-qwen2 abliterated"
    assert edited.value("general.finetune") == "abliterated"
    assert edited.value("general.tags") == ["abliterated", "uncensored", "refusal-edit"]
    assert edited.value("general.base_model.count") == 1
    assert edited.value("general.base_model.0.name") == "tiny-qwen2"
    assert edited.value("general.base_model.0.repo_url") == "https://huggingface.co/org/tiny-qwen2"
    assert lora.value("general.name") == "tiny-qwen2 abliterated LoRA" and lora.value("general.type") == "adapter"
    assert default_name(GGUFFile(base)) == "tiny-qwen2-abliterated.gguf"
    assert default_name(GGUFFile(base), lora=True) == "tiny-qwen2-abliterated-LoRA.gguf"


def test_gguf_outputs_default_to_ggml_names(tmp_path, cli, monkeypatch):
    """Without --out a GGUF edit or adapter goes to runs/<model>/ under ggml's file name (said on the way); a
    directory output still needs --out."""
    from gguf_tiny import HIDDEN, write_tiny

    from refusal_edit.directions.artifacts import save_direction

    monkeypatch.chdir(tmp_path)
    save_direction(tmp_path / "d.safetensors", torch.randn(HIDDEN), {"layer": 1, "position": -1, "model": "tiny"})
    base = write_tiny(tmp_path / "m.gguf", "qwen2")
    res = cli("orthogonalize", base, "--direction", tmp_path / "d.safetensors", "--format", "gguf-lora")
    assert res.code == 0, res.text
    assert (tmp_path / "runs" / "m" / "tiny-qwen2-abliterated-LoRA.gguf").is_file()
    assert "tiny-qwen2-abliterated-LoRA.gguf" in res.text
    res = cli("orthogonalize", base, "--direction", tmp_path / "d.safetensors", "--format", "peft")
    assert res.code == 1 and "give --out" in res.err
    res = cli("orthogonalize", base, "--direction", tmp_path / "d.safetensors", "--format", "peft", "--out", "x.gguf")
    assert res.code == 1 and "writes a directory" in res.err


def test_adapter_card_follows_hub_conventions(tmp_path, cli):
    """The adapter's card: library_name peft, base_model with relation adapter, the parent's licence, the Hub's
    tags for an abliterated model, pipeline_tag from the model class (a multimodal wrapper: image-text-to-text)."""
    import yaml

    src = save(build("gemma3"), tmp_path / "model")
    (src / "README.md").write_text("---\nlicense: gemma\n---\n# parent\n")
    make_direction(tmp_path / "d.safetensors")
    out = tmp_path / "adapter"
    args = ["--direction", tmp_path / "d.safetensors", "--format", "peft", "--base-model", "org/tiny"]
    assert cli("orthogonalize", src, *args, "--out", out).code == 0
    meta = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert meta["library_name"] == "peft" and meta["base_model"] == "org/tiny"
    assert meta["base_model_relation"] == "adapter" and meta["license"] == "gemma"
    assert meta["pipeline_tag"] == "image-text-to-text"
    assert {"refusal-edit", "abliterated", "uncensored", "lora"} <= set(meta["tags"])
    assert "PeftModel.from_pretrained" in (out / "README.md").read_text()
    assert json.loads((out / "refusal_edit.json").read_text())["format"] == "peft"
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny"


def test_push_dry_run_of_a_gguf_folder_and_an_adapter(tmp_path, cli):
    """push takes a folder of GGUF files this tool wrote (and a PEFT adapter folder): the files, a generated card
    (library_name gguf / peft, base_model) and, without --repo, the default name, said; nothing contacted."""
    from gguf_tiny import HIDDEN, write_tiny

    from refusal_edit.directions.artifacts import save_direction
    from refusal_edit.workflows.gguf import orthogonalize_gguf

    save_direction(tmp_path / "d.safetensors", torch.randn(HIDDEN), {"layer": 1, "position": -1, "model": "tiny"})
    base = write_tiny(tmp_path / "m.gguf", "qwen2")
    pub = tmp_path / "pub"
    for fmt, name in (("gguf", "edited.gguf"), ("gguf-lora", "lora.gguf")):
        orthogonalize_gguf(base, tmp_path / "d.safetensors", pub / name, format=fmt, base_model="org/tiny-qwen2")
    res = cli("push", pub, "--dry-run")
    assert res.code == 0, res.text
    assert "edited.gguf" in res.out and "lora.gguf" in res.out and "README.md (generated" in res.out
    assert "library_name: gguf" in res.out and "base_model: org/tiny-qwen2" in res.out
    assert "no --repo given: tiny-qwen2-abliterated" in res.err
    (tmp_path / "stray.gguf").write_bytes(base.read_bytes())
    (pub / "base.gguf").symlink_to(tmp_path / "stray.gguf")
    assert cli("push", pub, "--dry-run").code == 0  # a link is skipped, never followed
    (pub / "base.gguf").unlink()
    (pub / "base.gguf").write_bytes(base.read_bytes())
    res = cli("push", pub, "--dry-run")
    assert res.code == 1 and "base.gguf" in res.err and "not written by refusal-edit" in res.err

    src = save(build("mistral"), tmp_path / "model")
    make_direction(tmp_path / "dir.safetensors")
    args = ["--direction", tmp_path / "dir.safetensors", "--base-model", "org/tiny"]
    assert cli("orthogonalize", src, *args, "--format", "peft", "--out", tmp_path / "adapter").code == 0
    res = cli("push", tmp_path / "adapter", "--repo", "alice/tiny-lora", "--dry-run")
    assert res.code == 0, res.text
    assert "adapter_model.safetensors" in res.out and "library_name: peft" in res.out


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_llamacpp_applies_the_lora_as_the_edit(moe, tmp_path):
    """llama.cpp itself: base GGUF + our LoRA gives the edited GGUF's logits. An F32 base, so the edit is exact in
    both (no requantization): the dense model agrees to float rounding; fused experts (3-D pairs) closely."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf_tiny import HIDDEN, write_tiny

    from refusal_edit.directions.artifacts import save_direction
    from refusal_edit.workflows.gguf import orthogonalize_gguf

    torch.manual_seed(0)
    save_direction(tmp_path / "d.safetensors", torch.randn(HIDDEN), {"layer": 1, "position": -1, "model": "tiny"})
    arch = "qwen2moe" if moe else "qwen2"
    types = {"attn_type": Q.F32, "ffn_type": Q.F32, "embed_type": Q.F32}
    base = write_tiny(tmp_path / "m.gguf", arch, moe=moe, vocab=True, **types)
    orthogonalize_gguf(base, tmp_path / "d.safetensors", tmp_path / "e.gguf")
    orthogonalize_gguf(base, tmp_path / "d.safetensors", tmp_path / "l.gguf", format="gguf-lora")
    tokens = [1, 5, 9, 12, 33, 40, 7, 21]

    def logits(path, **kw):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False, logits_all=True, n_threads=1, **kw)
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)])

    original, edited = logits(base), logits(tmp_path / "e.gguf")
    adapted = logits(base, lora_path=str(tmp_path / "l.gguf"))
    change = np.abs(edited - original).max()
    assert change > 1e-2  # the edit changes the model
    if moe:  # llama.cpp's expert LoRA path (mul_mat_id) agrees to ~1e-3 relative here (0.02 of logits ~25), not 1e-6
        assert np.abs(adapted - edited).max() <= 0.05 * change
    else:
        assert np.abs(adapted - edited).max() <= 1e-4 * max(1.0, np.abs(edited).max())


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        (["--preserve-norm"], "not a low-rank change"),
        (["--mode", "add", "--layer", "0"], "carries directional ablation"),
        (["--keep-tied"], "exact, untied edit"),
        (["--dtype", "bfloat16"], "drop --dtype"),
    ],
    ids=["preserve-norm", "add", "keep-tied", "dtype"],
)
def test_what_an_adapter_cannot_carry_is_a_clear_error(extra, why, tmp_path, cli):
    src = save(build("qwen2"), tmp_path / "model")
    make_direction(tmp_path / "d.safetensors")
    out = tmp_path / "adapter"
    res = cli("orthogonalize", src, "--direction", tmp_path / "d.safetensors", "--format", "peft", "--out", out, *extra)
    assert res.code == 1 and why in res.err, res.err
    assert not out.exists()


def _hf_copy(gguf_path, folder):
    """The GGUF's model as an HF folder: every tensor dequantized under its HF name, and the config from its
    metadata (what llama.cpp's converter would have started from, to float rounding of an F32 file)."""
    from safetensors.torch import save_file

    from refusal_edit.gguf.hf_view import GGUFSource

    source = GGUFSource(gguf_path)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(source.config))
    save_file({i.name: source.read(i.name).contiguous() for i in source.infos()}, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_gguf_lora_from_an_hf_model_is_the_gguf_path_s_adapter(moe, tmp_path):
    """`--format gguf-lora` of an HF model (GGUF names from gguf.names): the same tensors, layout and deltas as
    the adapter written from the GGUF itself, and llama.cpp applies it to the GGUF as the edit."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf_tiny import HIDDEN, write_tiny

    from refusal_edit.directions.artifacts import save_direction
    from refusal_edit.gguf.file import GGUFFile
    from refusal_edit.workflows import orthogonalize
    from refusal_edit.workflows.gguf import orthogonalize_gguf

    torch.manual_seed(0)
    save_direction(tmp_path / "d.safetensors", torch.randn(HIDDEN), {"layer": 1, "position": -1, "model": "tiny"})
    arch = "qwen2moe" if moe else "qwen2"
    types = {"attn_type": Q.F32, "ffn_type": Q.F32, "embed_type": Q.F32}
    base = write_tiny(tmp_path / "m.gguf", arch, moe=moe, vocab=True, **types)
    hf = _hf_copy(base, tmp_path / "hf")
    d = tmp_path / "d.safetensors"
    outcome = orthogonalize(hf, d, tmp_path / "from-hf.gguf", format="gguf-lora", allow_foreign_direction=True)
    orthogonalize_gguf(base, d, tmp_path / "from-gguf.gguf", format="gguf-lora", allow_foreign_direction=True)
    ours, theirs = GGUFFile(tmp_path / "from-hf.gguf"), GGUFFile(tmp_path / "from-gguf.gguf")
    assert ours.arch == arch and ours.value("general.type") == "adapter" and ours.value("adapter.type") == "lora"
    assert set(ours.tensors) == set(theirs.tensors) and len(ours.tensors) == 2 * len(outcome.plan.transforms)
    assert ours.value("general.name") == "hf abliterated LoRA" and "abliterated" in ours.value("general.tags")

    def values(f, name):
        t = f.tensors[name]
        return f.rows(t, 0, t.n_rows).view(np.float32).reshape(t.hf_shape)

    for name in {n.rsplit(".lora_", 1)[0] for n in ours.tensors}:
        delta = [
            _ggml_delta(name, values(f, f"{name}.lora_a"), values(f, f"{name}.lora_b"), f.value("adapter.lora.alpha"))
            for f in (ours, theirs)
        ]
        assert np.abs(delta[0] - delta[1]).max() <= 1e-5, name
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    tokens = [1, 5, 9, 12, 33, 40, 7, 21]

    def logits(**kw):
        llm = llama_cpp.Llama(model_path=str(base), n_ctx=64, verbose=False, logits_all=True, n_threads=1, **kw)
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)])

    original = logits()
    from_hf, from_gguf = (
        logits(lora_path=str(tmp_path / "from-hf.gguf")),
        logits(lora_path=str(tmp_path / "from-gguf.gguf")),
    )
    assert np.abs(from_hf - original).max() > 1e-2  # llama.cpp found the tensors by name and applied them
    assert np.abs(from_hf - from_gguf).max() <= 1e-4 * max(1.0, np.abs(from_gguf).max())


@pytest.mark.parametrize(
    ("model_type", "why"),
    [
        ("mixtral", "no GGUF tensor names for model type 'mixtral'"),
        ("llama", "residual biases (e.g. blk.0.ffn_down.bias): llama.cpp adapters hold lora_a / lora_b pairs only"),
        ("tied", "ties its output head to its embeddings"),
    ],
)
def test_gguf_lora_from_an_hf_model_refuses_what_llamacpp_cannot_take(model_type, why, tmp_path, cli):
    model = build("qwen2", tie_word_embeddings=True) if model_type == "tied" else build(model_type)
    src = save(model, tmp_path / "model")
    make_direction(tmp_path / "d.safetensors")
    out = tmp_path / "l.gguf"
    res = cli("orthogonalize", src, "--direction", tmp_path / "d.safetensors", "--format", "gguf-lora", "--out", out)
    assert res.code == 1 and why in " ".join(res.err.split()), res.err
    assert not out.exists()
