"""The weight edit as a file operation: layouts, dtypes, copied files, records, and every error path."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import struct

import pytest
import torch
import yaml
from conftest import make_direction
from reference import FAMILIES, projected, uniform
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import build, save, token_batch
from transformers import AutoModelForCausalLM

from refusal_edit.checkpoint import safetensors_io
from refusal_edit.checkpoint.atomic import TMP_MARK


def digest_tree(root):
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def orth(cli, src, tmp_path, *extra, out="out"):
    d = tmp_path / "direction.safetensors"
    if not d.exists():
        make_direction(d)
    return cli("orthogonalize", src, "--direction", d, "--out", tmp_path / out, *extra)


def logits_of(path, x):
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(x).logits


def test_input_untouched_and_other_files_copied_byte_for_byte(tiny_dir, tmp_path, cli):
    src = tiny_dir("llama")
    (src / "notes.txt").write_text("keep me")
    (src / "pytorch_model.bin").write_bytes(b"pickle")  # unedited weights must not ride along
    before = digest_tree(src)
    res = orth(cli, src, tmp_path)
    assert res.code == 0, res.text
    assert digest_tree(src) == before
    out = tmp_path / "out"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "notes.txt", "config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name  # config unchanged: no flag changed
    assert not (out / "pytorch_model.bin").exists()
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        assert fh.metadata() == {"format": "pt"}
    assert not list(tmp_path.glob(f"*{TMP_MARK}*"))


def test_record_and_model_card(tiny_dir, tmp_path, cli):
    src = tiny_dir("llama")
    res = orth(cli, src, tmp_path, "--base-model", "org/base-model")
    assert res.code == 0, res.text
    record = json.loads((tmp_path / "out" / "refusal_edit.json").read_text())
    assert record["mode"] == "ablate" and record["base_model"] == "org/base-model"
    assert record["direction_sha256"] == hashlib.sha256((tmp_path / "direction.safetensors").read_bytes()).hexdigest()
    assert record["edited_tensors"] == {"embedding": 1, "linear": 6, "bias": 6}
    card = (tmp_path / "out" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "org/base-model"
    assert meta["base_model_relation"] == "finetune"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["refusal-edit", "abliterated", "uncensored"]
    assert "will follow harmful requests" in card

    res = orth(cli, src, tmp_path, "--mode", "add", "--coeff", "1", out="hypersafe")
    assert res.code == 0, res.text
    meta = yaml.safe_load((tmp_path / "hypersafe" / "README.md").read_text().split("---")[1])
    assert meta["tags"] == ["refusal-edit", "refusal-amplified"]
    assert "refuses more" in (tmp_path / "hypersafe" / "README.md").read_text()


def test_keep_tied_is_an_announced_approximation(tiny_dir, tmp_path, cli):
    src = tiny_dir("gemma")
    res = orth(cli, src, tmp_path, "--keep-tied")
    assert res.code == 0, res.text
    assert "approximate" in res.err
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg.get("tie_word_embeddings", True) is True
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as fh:
        assert "lm_head.weight" not in fh.keys()
    exact = orth(cli, src, tmp_path, out="exact")
    assert exact.code == 0
    x = token_batch()
    approx, exact_logits = logits_of(tmp_path / "out", x), logits_of(tmp_path / "exact", x)
    assert (approx - exact_logits).abs().max().item() > 1e-3  # the tied head differs from the exact edit


def test_config_defaults_come_from_transformers_when_config_json_omits_them(tiny_dir, tmp_path, cli):
    src = tiny_dir("gemma")
    cfg = json.loads((src / "config.json").read_text())
    del cfg["tie_word_embeddings"]  # Gemma's class default is True: the head must still be untied
    (src / "config.json").write_text(json.dumps(cfg))
    res = orth(cli, src, tmp_path)
    assert res.code == 0, res.text
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as fh:
        assert "lm_head.weight" in fh.keys()


def test_sharded_checkpoint_mirrors_shards_and_updates_index(tmp_path, cli):
    model = build("gemma")
    src = tmp_path / "model"
    model.save_pretrained(src, max_shard_size="20KB")
    save(model, tmp_path / "unused")  # tokenizer files for completeness
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(shards) > 2
    res = orth(cli, src, tmp_path)
    assert res.code == 0, res.text
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    embed_shard = index["weight_map"]["model.embed_tokens.weight"]
    assert index["weight_map"]["lm_head.weight"] == embed_shard
    total = 0
    for shard in shards:
        with safe_open(str(out / shard), "pt") as fh:
            for k in fh.keys():
                assert index["weight_map"][k] == shard
                t = fh.get_tensor(k)
                total += t.numel() * t.element_size()
    assert index["metadata"]["total_size"] == total
    x = token_batch()
    r = make_direction(tmp_path / "direction.safetensors").direction
    with torch.no_grad(), projected(model, FAMILIES["gemma"], uniform(r)):
        reference = model(x).logits
    assert (logits_of(out, x) - reference).abs().max().item() <= 1e-4


def tensors_in(folder) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def test_resharding_with_max_shard_size(tiny_dir, tmp_path, cli):
    """Resharding moves tensors between files and nothing else: value for value the unsharded edit."""
    src = tiny_dir("llama")
    res = orth(cli, src, tmp_path, "--max-shard-size", "30KB")
    assert res.code == 0, res.text
    files = sorted((tmp_path / "out").glob("model-*.safetensors"))
    assert len(files) > 1 and files[0].name.endswith(f"-of-{len(files):05d}.safetensors")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    assert orth(cli, src, tmp_path, out="whole").code == 0
    sharded, whole, source = tensors_in(tmp_path / "out"), tensors_in(tmp_path / "whole"), tensors_in(src)
    assert sharded.keys() == whole.keys()
    assert [k for k in whole if not torch.equal(sharded[k], whole[k])] == []
    assert not torch.equal(
        whole["model.layers.0.self_attn.o_proj.weight"], source["model.layers.0.self_attn.o_proj.weight"]
    )
    x = token_batch()
    assert torch.equal(logits_of(tmp_path / "out", x), logits_of(tmp_path / "whole", x))


def test_fused_experts_on_disk_are_edited(tmp_path, cli):
    model = build("mixtral")
    src = tmp_path / "model"
    model.save_pretrained(src, save_original_format=False)
    with safe_open(str(src / "model.safetensors"), "pt") as fh:
        assert "model.layers.0.mlp.experts.down_proj" in fh.keys()
    res = orth(cli, src, tmp_path)
    assert res.code == 0, res.text
    x = token_batch()
    r = make_direction(tmp_path / "direction.safetensors").direction
    with torch.no_grad(), projected(model, FAMILIES["mixtral"], uniform(r)):
        reference = model(x).logits
    assert (logits_of(tmp_path / "out", x) - reference).abs().max().item() <= 1e-4


def test_missing_expert_is_an_error_not_a_partial_edit(tmp_path, cli):
    model = build("qwen3_moe")
    src = save(model, tmp_path / "model")
    path = src / "model.safetensors"
    with safe_open(str(path), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys() if k != "model.layers.1.mlp.experts.2.down_proj.weight"}
    save_file(tensors, str(path), metadata={"format": "pt"})
    res = orth(cli, src, tmp_path)
    assert res.code == 1
    assert "layer 1 has 3 expert output projections, the config says 4" in res.err


def test_bfloat16_checkpoint_stays_bfloat16_and_matches_float32_edit(tmp_path, cli):
    model = build("qwen2")
    src = tmp_path / "model"
    model.to(torch.bfloat16).save_pretrained(src)
    res = orth(cli, src, tmp_path)
    assert res.code == 0, res.text
    res32 = orth(cli, src, tmp_path, "--dtype", "float32", out="out32")
    assert res32.code == 0, res32.text
    with (
        safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as a,
        safe_open(str(tmp_path / "out32" / "model.safetensors"), "pt") as b,
    ):
        for k in a.keys():
            ta, tb = a.get_tensor(k), b.get_tensor(k)
            assert ta.dtype == torch.bfloat16 and tb.dtype == torch.float32
            assert torch.equal(ta, tb.to(torch.bfloat16)), k  # computed in float32, cast back once
    assert json.loads((tmp_path / "out32" / "config.json").read_text())["dtype"] == "float32"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("wrong_size", "direction has size 16, the model's hidden size is 32"),
        ("nan", "direction contains NaN"),
        ("zero", "direction is the zero vector"),
        ("no_direction_tensor", "has no tensor named 'direction'"),
        ("missing_direction", "direction file not found"),
        ("truncated_shard", "truncated safetensors file"),
        ("garbage_shard", "corrupt safetensors file"),
        ("missing_shard", "missing shard"),
        ("unsupported", "unsupported architecture 'bert': layer 0"),
        ("exists", "output exists"),
        ("same_dir", "is the input"),
        ("quantized", "quantized checkpoints (gptq) cannot be edited"),
        ("ablate_coeff", "--coeff applies to --mode add"),
        ("no_model", "model not found"),
    ],
)
def test_bad_input_is_one_clear_line(setup, message, tmp_path, cli):
    model = build("llama")
    src = save(model, tmp_path / "model")
    d = tmp_path / "direction.safetensors"
    make_direction(d)
    out = tmp_path / "out"
    extra: list[str] = []
    if setup == "wrong_size":
        make_direction(d, hidden=16)
    elif setup == "nan":
        save_file({"direction": torch.full((32,), math.nan)}, str(d))
    elif setup == "zero":
        save_file({"direction": torch.zeros(32)}, str(d))
    elif setup == "no_direction_tensor":
        save_file({"vec": torch.ones(32)}, str(d))
    elif setup == "missing_direction":
        d = tmp_path / "nope.safetensors"
    elif setup == "truncated_shard":
        data = (src / "model.safetensors").read_bytes()
        (src / "model.safetensors").write_bytes(data[: len(data) - 100])
    elif setup == "garbage_shard":
        (src / "model.safetensors").write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 64)
    elif setup == "missing_shard":
        model.save_pretrained(src, max_shard_size="20KB")
        next(iter(sorted(src.glob("model-*.safetensors")))).unlink()
    elif setup == "unsupported":
        cfg = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    elif setup == "exists":
        out.mkdir()
    elif setup == "same_dir":
        out = src
        extra = ["--force"]
    elif setup == "quantized":
        cfg = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gptq"}}))
    elif setup == "ablate_coeff":
        extra = ["--coeff", "2"]
    elif setup == "no_model":
        src = tmp_path / "no-such-model"
    before = digest_tree(src) if src.exists() else {}
    res = cli("orthogonalize", src, "--direction", d, "--out", out, *extra)
    assert res.code == 1, res.text
    assert message in res.err
    assert "Traceback" not in res.text
    assert len([ln for ln in res.err.strip().splitlines() if ln.strip()]) <= 3  # one message (rich may wrap)
    if setup not in ("exists", "same_dir"):
        assert not out.exists()
    if src.exists():
        assert digest_tree(src) == before
    assert not list(tmp_path.glob(f"*{TMP_MARK}*"))


def test_failure_mid_write_leaves_nothing(tiny_dir, tmp_path, cli, monkeypatch):
    from refusal_edit.checkpoint import safetensors_io

    src = tiny_dir("llama")
    calls = {"n": 0}
    original = safetensors_io.ShardWriter.write_chunk

    def flaky(self, name, chunk):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        return original(self, name, chunk)

    monkeypatch.setattr(safetensors_io.ShardWriter, "write_chunk", flaky)
    res = orth(cli, src, tmp_path)
    assert res.code == 1
    assert "disk full while writing" in res.err
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(f"*{TMP_MARK}*"))


def test_force_replaces_only_a_previous_output_and_only_after_success(tiny_dir, tmp_path, cli):
    src = tiny_dir("llama")
    out = tmp_path / "out"
    assert orth(cli, src, tmp_path).code == 0
    (out / "old.txt").write_text("old")
    res = orth(cli, src, tmp_path, "--force")
    assert res.code == 0, res.text
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    mine = tmp_path / "mine"  # not written by refusal-edit: --force leaves it alone
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    res = orth(cli, src, tmp_path, "--force", out="mine")
    assert res.code == 1 and "not an output of refusal-edit" in res.err
    assert (mine / "thesis.tex").read_text() == "years of work"
    (tmp_path / "empty").mkdir()  # an empty folder may be replaced
    assert orth(cli, src, tmp_path, "--force", out="empty").code == 0


def test_add_without_mean_diff_needs_unit(tiny_dir, tmp_path, cli):
    src = tiny_dir("llama")
    save_file({"direction": torch.ones(32)}, str(tmp_path / "direction.safetensors"), metadata={"layer": "1"})
    res = orth(cli, src, tmp_path, "--mode", "add")
    assert res.code == 1 and "pass --unit" in res.err
    res = orth(cli, src, tmp_path, "--mode", "add", "--unit")
    assert res.code == 0, res.text
    record = json.loads((tmp_path / "out" / "refusal_edit.json").read_text())
    assert record["layer"] == 1 and record["unit"] is True


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_chunks_without_the_float_cache_give_the_same_tensors(arch, dtype, tmp_path, cli, monkeypatch):
    """Every streaming path (whole-tensor float cache, two passes from disk, reused buffers of many
    chunk sizes, dtype conversion) writes the same tensors."""
    import refusal_edit.edits.write as write
    from refusal_edit.checkpoint.safetensors_io import chunk_rows

    model = build(arch)  # row-wise (embeddings, GPT-2 Conv1D) and two-pass column-wise (Linear, biases) edits
    src = tmp_path / "model"
    model.to(dtype).save_pretrained(src)
    for extra, name in (((), "out"), (("--dtype", "float16"), "out16")):
        assert orth(cli, src, tmp_path, *extra, out=name).code == 0
        monkeypatch.setattr(write, "FLOAT_CACHE_BYTES", 0)
        monkeypatch.setattr(write, "chunk_rows", lambda info: chunk_rows(info, 700))  # odd row counts
        assert orth(cli, src, tmp_path, *extra, out=name + "-small").code == 0
        monkeypatch.undo()
        a_dir, b_dir = tmp_path / name, tmp_path / (name + "-small")
        assert (a_dir / "config.json").read_bytes() == (b_dir / "config.json").read_bytes()
        with (
            safe_open(str(a_dir / "model.safetensors"), "pt") as a,
            safe_open(str(b_dir / "model.safetensors"), "pt") as b,
        ):
            assert list(a.keys()) == list(b.keys())
            for k in a.keys():
                ta, tb = a.get_tensor(k), b.get_tensor(k)
                assert ta.dtype == tb.dtype == (torch.float16 if extra else dtype), k
                # Sums over other chunkings round differently in float32: at most one step of the output dtype.
                rtol = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[ta.dtype]
                assert torch.allclose(ta.float(), tb.float(), rtol=rtol, atol=1e-6), k


def test_unchanged_tensors_copy_the_same_without_kernel_copies(tiny_dir, tmp_path, cli, monkeypatch):
    """Filesystems without `copy_file_range` (or across devices) fall back to plain reads: same bytes."""
    src = tiny_dir("llama")
    assert orth(cli, src, tmp_path, out="kernel").code == 0
    calls = []

    def unsupported(*args):
        calls.append(args)
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(safetensors_io.os, "copy_file_range", unsupported)
    res = orth(cli, src, tmp_path, out="plain")
    assert res.code == 0, res.text
    assert calls  # the fallback was taken
    kernel, plain = digest_tree(tmp_path / "kernel"), digest_tree(tmp_path / "plain")
    assert kernel.pop("refusal_edit.json") != plain.pop("refusal_edit.json")  # the record names its folder
    kernel.pop("README.md"), plain.pop("README.md")
    assert kernel == plain
