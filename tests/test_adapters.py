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
# fused experts (3-D parameters), what PEFT itself refuses to wrap. Every other table entry must be carried exactly.
BIASES = {"llama", "qwen3", "gpt2", "gpt_neox", "smollm3", "seed_oss", "phimoe", "gpt_oss", "qwen3_moe"}
EXPERTS = {"mixtral", "qwen2_moe", "glm4_moe", "deepseek_v3", "qwen3_next", "granitemoe"}
REFUSED = {**{t: "residual biases" for t in BIASES}, **{t: "fused experts" for t in EXPERTS}}
REFUSED["falcon_h1"] = "incompatible with Mamba"  # PEFT's own check: no LoRA on a Mamba mixer's out_proj
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
    if model_type in REFUSED:
        assert res.code == 1, res.text
        assert REFUSED[model_type] in res.err and "write a checkpoint" in res.err
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
