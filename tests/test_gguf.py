"""GGUF -> GGUF edits and control vectors on tiny GGUF files written with gguf-py (no llama.cpp needed)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf_tiny import EXPERTS, FF, HIDDEN, VOCAB, write_tiny

from refusal_edit.checkpoint.record import EditRecord
from refusal_edit.directions.artifacts import load_direction, save_direction
from refusal_edit.edits.plan import plan_ablation
from refusal_edit.edits.spec import EditSpec
from refusal_edit.errors import RefusalEditError
from refusal_edit.gguf import quants, rounding
from refusal_edit.gguf.cvec import parse_layers, read_control_vector, tensor_name, write_control_vector
from refusal_edit.gguf.edit import RECORD_KEY, fallback_type, write_gguf
from refusal_edit.gguf.file import GGUFFile
from refusal_edit.gguf.hf_view import GGUFSource
from refusal_edit.workflows.gguf import orthogonalize_gguf

Q = GGMLQuantizationType
QUANTIZED = [t for t in quants.EDITABLE if t not in quants.PLAIN]
# Relative rms error of one quantization of N(0, 1) rows, with margin (measured: Q2_K 0.30, Q3_K 0.15,
# Q4_0 0.086, Q4_1 0.078, Q4_K 0.072, Q5_0 0.043, Q5_1 0.038, Q5_K 0.036, Q6_K 0.018, Q8_0 0.0054).
BOUND = {
    Q.Q2_K: 0.35,
    Q.Q3_K: 0.18,
    Q.Q4_0: 0.1,
    Q.Q4_1: 0.09,
    Q.Q4_K: 0.085,
    Q.Q5_0: 0.05,
    Q.Q5_1: 0.045,
    Q.Q5_K: 0.042,
    Q.Q6_K: 0.022,
    Q.Q8_0: 0.007,
    Q.F16: 1e-3,
    Q.BF16: 5e-3,
    Q.F32: 0.0,
    Q.F64: 0.0,
}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _deq(gguf: GGUFFile, name: str) -> np.ndarray:
    t = gguf.tensors[name]
    return quants.dequantize(gguf.rows(t, 0, t.n_rows), t.qtype, t.row_size).reshape(t.hf_shape)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def direction(tmp) -> Path:
    torch.manual_seed(3)
    path = tmp / "direction.safetensors"
    save_direction(path, torch.randn(HIDDEN) * 3, {"layer": 1, "position": -1, "model": "tiny"})
    return path


@pytest.fixture(scope="module")
def qwen(tmp) -> Path:
    return write_tiny(tmp / "qwen.gguf", "qwen2", ffn_type=[Q.Q4_K, Q.Q6_K])


# ------------------------------------------------------------------------------------------ quantization


@pytest.mark.parametrize("qtype", list(quants.EDITABLE), ids=lambda t: t.name)
def test_requantization_error_per_type(qtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 512)).astype(np.float32)
    x[1, :256] = 0  # an all-zero block decodes to zeros
    x[2, :32] = -2.5  # a constant sub-block
    data = quants.quantize(x, qtype)
    assert data.shape == (6, quants.row_bytes(qtype, 512))
    back = quants.dequantize(data, qtype, 512)  # gguf-py's dequantizer
    assert _rel(back, x) <= BOUND[qtype]
    assert np.all(back[1, :256] == 0)
    assert np.abs(back[2, :32] + 2.5).max() < 0.5 * BOUND[qtype] * 2.5 + 1e-6


@pytest.mark.parametrize("qtype", list(rounding.CODECS), ids=lambda t: t.name)
def test_codec_reads_and_writes_levels(qtype):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((4, 512)) * 0.1).astype(np.float32)
    data = quants.quantize(x, qtype)
    a, c, lv = rounding.grid(data, qtype, x.shape)
    np.testing.assert_array_equal(a * lv + c, quants.dequantize(data, qtype, 512))
    assert np.array_equal(rounding.with_levels(data, qtype, lv), data)
    codec = rounding.CODECS[qtype]
    moved = np.clip(lv + rng.integers(-1, 2, lv.shape), codec.lo, codec.hi)
    back = quants.dequantize(rounding.with_levels(data, qtype, moved), qtype, 512)
    np.testing.assert_array_equal(back, a * moved + c)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_0, Q.Q6_K, Q.Q8_0, Q.Q3_K], ids=lambda t: t.name)
def test_direction_rounding_keeps_the_direction_removed(qtype):
    """Nearest rounding snaps small edits back (most of r returns); balanced rounding leaves < 2% of it."""
    from refusal_edit.edits.ops import ProjectFirstDim, apply_whole

    rng = np.random.default_rng(2)
    rows, cols = 384, 512
    w = quants.dequantize(
        quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32) * 0.02, qtype), qtype, cols
    )
    r = torch.from_numpy(rng.standard_normal(rows).astype(np.float32))
    r = r / r.norm()
    t = ProjectFirstDim(r)
    target = apply_whole(t, torch.from_numpy(w.copy())).numpy()
    data = quants.quantize(target, qtype)
    naive = quants.dequantize(data, qtype, cols)
    fixed = rounding.DirectionRounding(t, qtype)(0, rows, target, data, (rows, cols))
    balanced = quants.dequantize(fixed, qtype, cols)
    before = np.linalg.norm(r.numpy() @ w)
    left_naive = np.linalg.norm(r.numpy() @ naive) / before
    left = np.linalg.norm(r.numpy() @ balanced) / before
    assert left < 0.02 and left < left_naive / 4
    assert _rel(balanced, target) < 1.6 * max(_rel(naive, target), 0.5 * BOUND[qtype])


# ------------------------------------------------------------------------------------------ edits


def test_source_presents_hf_names_shapes_and_config(qwen):
    src = GGUFSource(qwen)
    assert src.config["model_type"] == "qwen2" and src.config["hidden_size"] == HIDDEN
    assert src.config["tie_word_embeddings"] is False
    down = src.find("model.layers.1.mlp.down_proj.weight")
    assert down is not None and down.shape == (HIDDEN, FF) and down.dtype == "F32"
    assert src.find("model.embed_tokens.weight").shape == (VOCAB, HIDDEN)
    assert src.tensor("model.layers.0.self_attn.o_proj.weight").name == "blk.0.attn_output.weight"


def test_ablation_edits_writers_in_their_own_types(tmp, qwen, direction):
    before = _sha(qwen)
    out = tmp / "qwen-abl.gguf"
    result = orthogonalize_gguf(qwen, direction, out, base_model="Org/tiny")
    assert _sha(qwen) == before  # the input is never modified
    assert not list(tmp.glob("*.tmp-refusal-edit-*"))
    src, edited = GGUFFile(qwen), GGUFFile(out)
    assert 0 <= out.stat().st_size - qwen.stat().st_size < 96 << 10  # same tensors; only the record is new
    assert [t.name for t in edited.tensors.values()] == list(src.tensors)
    r = load_direction(direction).direction.numpy()
    writers = {"token_embd.weight", *(f"blk.{i}.{n}.weight" for i in range(2) for n in ("attn_output", "ffn_down"))}
    for name, t in src.tensors.items():
        e = edited.tensors[name]
        assert (e.qtype, e.ne) == (t.qtype, t.ne)
        if name not in writers:
            assert np.array_equal(src.rows(t, 0, t.n_rows), edited.rows(e, 0, e.n_rows)), name
            continue
        w, w2 = _deq(src, name), _deq(edited, name)
        exact = w - np.outer(w @ r, r) if name == "token_embd.weight" else w - np.outer(r, r @ w)
        assert _rel(w2, exact) < 2 * BOUND[t.qtype]
        left = np.linalg.norm(w2 @ r if name == "token_embd.weight" else r @ w2)
        assert left < 0.05 * np.linalg.norm(w @ r if name == "token_embd.weight" else r @ w), name
    by_type = result.write.by_type()
    assert set(by_type) == {"Q8_0", "Q5_0", "Q4_K", "Q6_K"}
    assert all(v["rel_error_max"] < 2 * BOUND[Q[k]] for k, v in by_type.items())
    # every metadata entry is kept but those that name the file (an edit of its input: gguf.metadata), the record
    # is added
    from refusal_edit.gguf.metadata import replaced

    for key in src.keys():
        assert replaced(key) or edited.value(key) == src.value(key), key
    assert edited.value("general.finetune") == "abliterated"
    record = EditRecord.from_json(edited.value(RECORD_KEY))
    assert record.format == "gguf" and record.base_model == "Org/tiny"
    assert record.edited_tensors == {"embedding": 1, "linear": 4}
    assert set(record.extra["requantization"]) == set(by_type)
    assert json.loads(edited.value("refusal_edit.requantization")) == json.loads(json.dumps(by_type))
    GGUFReader(out)  # gguf-py reads the output


def test_re_edit_carries_the_previous_record(tmp, qwen, direction):
    first = tmp / "first.gguf"
    orthogonalize_gguf(qwen, direction, first, base_model="Org/tiny")
    result = orthogonalize_gguf(first, direction, tmp / "second.gguf")
    assert result.record.previous_edit["format"] == "gguf"
    assert result.record.base_model == "Org/tiny"


def test_tied_head_is_untied_by_default_and_kept_on_request(tmp, direction):
    tied = write_tiny(tmp / "tied.gguf", "qwen2", ffn_type=Q.Q5_0, tied=True)
    src = GGUFFile(tied)
    assert "output.weight" not in src.tensors
    orthogonalize_gguf(tied, direction, tmp / "untied.gguf")
    out = GGUFFile(tmp / "untied.gguf")
    head, embed = out.tensors["output.weight"], src.tensors["token_embd.weight"]
    assert (head.qtype, head.ne) == (embed.qtype, embed.ne)
    assert np.array_equal(out.rows(head, 0, head.n_rows), src.rows(embed, 0, embed.n_rows))  # the original
    assert list(out.tensors).index("output.weight") == list(out.tensors).index("token_embd.weight") + 1
    orthogonalize_gguf(tied, direction, tmp / "kept.gguf", keep_tied=True)
    kept = GGUFFile(tmp / "kept.gguf")
    assert "output.weight" not in kept.tensors
    assert "embeddings kept tied" in " ".join(EditRecord.from_json(kept.value(RECORD_KEY)).notes)


def test_gemma_norm_gain_is_stored_plus_one(tmp, direction):
    """llama.cpp stores Gemma's gain as 1 + w: the plan sees w, and the edit removes normalize((1 + w) * r)."""
    path = write_tiny(tmp / "gemma.gguf", "gemma3", attn_type=Q.Q8_0, ffn_type=Q.Q8_0, tied=True)
    src = GGUFSource(path)
    assert src.config["model_type"] == "gemma3_text"
    gguf = src.gguf
    stored = _deq(gguf, "blk.0.post_attention_norm.weight")
    np.testing.assert_allclose(src.read("model.layers.0.post_attention_layernorm.weight").numpy(), stored - 1)
    out = tmp / "gemma-abl.gguf"
    orthogonalize_gguf(path, direction, out)
    edited = GGUFFile(out)
    r = load_direction(direction).direction.numpy()
    for i in range(2):
        for writer, norm in (("attn_output", "post_attention_norm"), ("ffn_down", "post_ffw_norm")):
            gain = _deq(gguf, f"blk.{i}.{norm}.weight")  # the gain llama.cpp multiplies by
            u = gain * r / np.linalg.norm(gain * r)
            w, w2 = _deq(gguf, f"blk.{i}.{writer}.weight"), _deq(edited, f"blk.{i}.{writer}.weight")
            assert np.linalg.norm(u @ w2) < 0.02 * np.linalg.norm(u @ w)
            assert np.linalg.norm(r @ w2) > 0.05 * np.linalg.norm(r @ w)  # not the plain-r edit


def test_moe_experts_are_edited_per_expert(tmp, direction):
    path = write_tiny(tmp / "moe.gguf", "qwen2moe", ffn_type=Q.Q4_K, moe=True)
    src = GGUFSource(path)
    down = src.find("model.layers.0.mlp.experts.down_proj")
    assert down is not None and down.shape == (EXPERTS, HIDDEN, FF)
    out = tmp / "moe-abl.gguf"
    result = orthogonalize_gguf(path, direction, out)
    assert result.plan.counts == {"embedding": 1, "linear": 4, "experts": 2}
    edited, gguf = GGUFFile(out), src.gguf
    r = load_direction(direction).direction.numpy()
    for i in range(2):
        w, w2 = _deq(gguf, f"blk.{i}.ffn_down_exps.weight"), _deq(edited, f"blk.{i}.ffn_down_exps.weight")
        for e in range(EXPERTS):
            assert np.linalg.norm(r @ w2[e]) < 0.05 * np.linalg.norm(r @ w[e])
        assert edited.tensors[f"blk.{i}.ffn_down_exps.weight"].qtype == Q.Q4_K
        shared = _deq(edited, f"blk.{i}.ffn_down_shexp.weight")
        assert np.linalg.norm(r @ shared) < 0.05 * np.linalg.norm(r @ _deq(gguf, f"blk.{i}.ffn_down_shexp.weight"))
    for name in ("ffn_gate_exps", "ffn_up_exps"):
        t = gguf.tensors[f"blk.0.{name}.weight"]
        assert np.array_equal(gguf.rows(t, 0, t.n_rows), edited.rows(edited.tensors[t.name], 0, t.n_rows))


def test_addition_at_layer_zero_and_a_clear_error_elsewhere(tmp, qwen, direction):
    d = load_direction(direction)
    out = tmp / "add0.gguf"
    orthogonalize_gguf(qwen, d, out, EditSpec(mode="add", coeff=0.5, layer=0))
    e, s = _deq(GGUFFile(out), "token_embd.weight"), _deq(GGUFFile(qwen), "token_embd.weight")
    assert _rel(e - s, np.broadcast_to(0.5 * d.mean_diff.numpy(), s.shape)) < 0.05
    with pytest.raises(RefusalEditError, match="export-cvec"):
        orthogonalize_gguf(qwen, d, tmp / "add1.gguf", EditSpec(mode="add", layer=1))
    assert not (tmp / "add1.gguf").exists()


def test_unsupported_type_falls_back_with_a_notice(tmp, direction):
    """An IQ4_NL writer (gguf-py reads it, nothing here writes it) is stored as the nearest writable type."""
    path = write_tiny(tmp / "iq.gguf", "qwen2", ffn_type=[Q.IQ4_NL, Q.Q4_K])
    src = GGUFSource(path)
    stored_as = fallback_type(Q.IQ4_NL, FF)
    assert stored_as in (Q.Q4_0, Q.Q4_K)
    plan = plan_ablation(src, load_direction(direction).direction)
    result = write_gguf(src, plan, tmp / "iq-abl.gguf")
    notes = [n for n in result.notes if "IQ4_NL" in n]
    assert len(notes) == 1 and "blk.0.ffn_down.weight" in notes[0] and stored_as.name in notes[0]
    assert notes[0] in result.record["notes"]
    edited = GGUFFile(tmp / "iq-abl.gguf")
    assert edited.tensors["blk.0.ffn_down.weight"].qtype == stored_as
    r = load_direction(direction).direction.numpy()
    w, w2 = _deq(src.gguf, "blk.0.ffn_down.weight"), _deq(edited, "blk.0.ffn_down.weight")
    assert np.linalg.norm(r @ w2) < 0.05 * np.linalg.norm(r @ w)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "header"])
def test_bad_gguf_is_a_clear_error_and_writes_nothing(tmp, qwen, direction, damage):
    bad = tmp / f"bad-{damage}.gguf"
    data = qwen.read_bytes()
    bad.write_bytes(
        {"garbage": b"not a gguf at all" * 10, "truncated": data[: len(data) - 5000], "header": data[:300]}[damage]
    )
    out = tmp / f"bad-{damage}-out.gguf"
    with pytest.raises(RefusalEditError, match="GGUF file") as info:
        orthogonalize_gguf(bad, direction, out)
    assert ("truncated" in str(info.value)) == (damage == "truncated")
    assert not out.exists() and not list(tmp.glob(f"bad-{damage}-out*"))


def test_split_gguf_is_refused(tmp, direction):
    part = write_tiny(tmp / "part-00001-of-00002.gguf", "qwen2", ffn_type=Q.Q5_0, split_count=2)
    with pytest.raises(RefusalEditError, match="split GGUF"):
        orthogonalize_gguf(part, direction, tmp / "part-out.gguf")


def test_existing_output_needs_force_and_is_only_replaced_when_ours(tmp, qwen, direction):
    out = tmp / "exists.gguf"
    out.write_bytes(b"someone else's file")
    with pytest.raises(RefusalEditError, match="output exists"):
        orthogonalize_gguf(qwen, direction, out)
    with pytest.raises(RefusalEditError, match="not a GGUF written by refusal-edit"):
        orthogonalize_gguf(qwen, direction, out, force=True)
    assert out.read_bytes() == b"someone else's file"
    with pytest.raises(RefusalEditError, match="input"):
        orthogonalize_gguf(qwen, direction, qwen, force=True)


# ------------------------------------------------------------------------------------------ control vectors


def test_control_vector_layer_numbering(tmp, direction, qwen):
    """Addition at the input of HF layer L is llama.cpp's direction.(L-1) (added to block L-1's output)."""
    assert tensor_name(2) == "direction.1" and tensor_name(16) == "direction.15"
    with pytest.raises(RefusalEditError, match=r"direction\.0"):
        tensor_name(1)
    assert parse_layers(None, 5, None) == [5]
    assert parse_layers("3:6", None, 24) == [3, 4, 5]
    assert parse_layers("4:", None, 6) == [4, 5, 6]
    with pytest.raises(RefusalEditError, match="out of range"):
        parse_layers("20:30", None, 24)
    d = load_direction(direction)
    with pytest.raises(RefusalEditError, match="out of range"):  # the tiny model has 2 layers: L <= 2
        write_control_vector(d, tmp / "cv.gguf", layers="2:4", model=qwen)
    cv = write_control_vector(d, tmp / "cv.gguf", coeff=-1.0, layers="2:4")
    assert cv.tensors == ["direction.1", "direction.2"]
    vectors = read_control_vector(tmp / "cv.gguf")
    assert sorted(vectors) == [2, 3]
    np.testing.assert_allclose(vectors[2], -d.mean_diff.numpy(), rtol=1e-6)
    gguf = GGUFFile(tmp / "cv.gguf")
    assert gguf.arch == "controlvector" and gguf.value("controlvector.layer_count") == 2
    assert gguf.value("controlvector.model_hint") == "tiny"
    write_control_vector(d, tmp / "cv-q.gguf", layers="2", model=qwen)
    assert GGUFFile(tmp / "cv-q.gguf").value("controlvector.model_hint") == "qwen2"
    with pytest.raises(RefusalEditError, match=r"direction\.0"):
        write_control_vector(d, tmp / "cv1.gguf")  # the direction's own layer is 1
    assert not (tmp / "cv1.gguf").exists()


def test_export_cvec_cli(tmp, direction, qwen, cli):
    import refusal_edit.cli.export_cvec  # noqa: F401  (registration, until cli/__init__ imports it)

    res = cli("export-cvec", direction, "--out", tmp / "cli-cv.gguf", "--layers", "2", "--unit", "--coeff", "4")
    assert res.code == 0, res.text
    assert "direction.1" in res.out
    np.testing.assert_allclose(np.linalg.norm(read_control_vector(tmp / "cli-cv.gguf")[2]), 4.0, rtol=1e-5)
    res = cli("export-cvec", direction, "--out", tmp / "cli-cv.gguf", "--layers", "2")
    assert res.code == 1 and "--force" in res.text
    wrong = tmp / "wrong.safetensors"
    save_direction(wrong, torch.randn(HIDDEN + 1), {"layer": 3, "position": -1})
    res = cli("export-cvec", wrong, "--out", tmp / "cli-cv2.gguf", "--model", qwen)
    assert res.code == 1 and "hidden size" in res.text


# ------------------------------------------------------------------------------------------ through orthogonalize


def test_orthogonalize_cli_writes_gguf_for_a_gguf_model(tmp, qwen, direction, cli):
    """`orthogonalize MODEL.gguf --out X.gguf` routes to the GGUF editor: same types and size, flat record keys."""
    out = tmp / "cli-edit.gguf"
    res = cli("orthogonalize", qwen, "--direction", direction, "--out", out, "--base-model", "Org/tiny")
    assert res.code == 0, res.text
    assert "requantized" in res.err  # per-type requantization figures
    src, edited = GGUFFile(qwen), GGUFFile(out)
    assert [(t.name, t.qtype, t.nbytes) for t in edited.tensors.values()] == [
        (t.name, t.qtype, t.nbytes) for t in src.tensors.values()
    ]
    assert edited.value("refusal_edit.mode") == "ablate" and edited.value("refusal_edit.format") == "gguf"
    assert edited.value("refusal_edit.base_model") == "Org/tiny"
    assert edited.value("refusal_edit.direction_sha256") == load_direction(direction).sha256
    assert EditRecord.from_json(edited.value(RECORD_KEY)).base_model == "Org/tiny"
    res = cli("orthogonalize", qwen, "--direction", direction, "--out", tmp / "x.gguf", "--dtype", "bfloat16")
    assert res.code == 1 and "--dtype" in res.text and not (tmp / "x.gguf").exists()


def test_orthogonalize_gguf_variant_spec(tmp, qwen, direction):
    """An edit variant (`EditSpec`: layers 1:2 at weight 0.5) on a GGUF: the same plan as the HF path."""
    from refusal_edit.edits.spec import variant
    from refusal_edit.workflows import orthogonalize

    out = tmp / "variant.gguf"
    result = orthogonalize(qwen, direction, out, variant(layers="1:2", weight=0.5))
    assert result.record is not None and result.record.mode == "ablate" and result.record.spec is not None
    src, edited = GGUFFile(qwen), GGUFFile(out)
    untouched = ["token_embd.weight", "blk.0.attn_output.weight", "blk.0.ffn_down.weight"]
    for name in untouched:
        t, e = src.tensors[name], edited.tensors[name]
        assert np.array_equal(src.rows(t, 0, t.n_rows), edited.rows(e, 0, e.n_rows)), name
    r = load_direction(direction).direction.numpy()
    w, w2 = _deq(src, "blk.1.attn_output.weight"), _deq(edited, "blk.1.attn_output.weight")
    ratio = np.linalg.norm(r @ w2) / np.linalg.norm(r @ w)
    assert abs(ratio - 0.5) < 0.05  # half of the component removed


def test_gguf_out_needs_a_gguf_model(tmp, direction):
    from refusal_edit.loading.gguf import gguf_model

    with pytest.raises(RefusalEditError, match="GGUF `model`"):
        gguf_model(tmp)
    with pytest.raises(RefusalEditError, match="not found"):
        gguf_model(tmp / "missing.gguf")


@pytest.mark.parametrize("arch", ["gemma4", "minimax-m2"])
def test_a_gguf_of_a_derived_family_is_refused_in_one_line(tmp, direction, cli, arch):
    """transformers reads these GGUFs, but their writers are only derived (no table entry): how llama.cpp stores
    them has no independent check, so the GGUF editor refuses in one line, names the way out, writes nothing."""
    path = tmp / f"{arch}.gguf"
    w = GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.add_embedding_length(HIDDEN)
    w.add_tensor("token_embd.weight", np.zeros((VOCAB, HIDDEN), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for fmt in ("gguf", "gguf-lora"):
        out = tmp / f"{arch}-{fmt}.gguf"
        res = cli("orthogonalize", path, "--direction", direction, "--out", out, "--format", fmt)
        assert res.code == 1 and not out.exists(), res.text
        line = res.err.strip()
        assert "\n" not in line and f"GGUF architecture {arch!r} cannot be edited as GGUF (its residual" in line
        assert "derived" in line and "give --out a directory" in line and "qwen2" in line


def test_derived_specs_edit_a_table_family_gguf_byte_for_byte_as_the_table(tmp, direction, monkeypatch):
    """With the table switched off (test-only), the GGUF editor plans through the spec derived from the file's
    own config: the same tensors, names and bytes as the table path (attention, routed and shared experts)."""
    from refusal_edit.arch import NO_TABLE_ENV

    for name, kwargs in (("qwen2moe", {"moe": True}),):
        path = write_tiny(tmp / f"derived-{name}.gguf", name, ffn_type=Q.Q4_K, **kwargs)
        table = orthogonalize_gguf(path, direction, tmp / f"derived-{name}-table.gguf")
        with monkeypatch.context() as m:
            m.setenv(NO_TABLE_ENV, "1")
            derived = orthogonalize_gguf(path, direction, tmp / f"derived-{name}-derived.gguf")
            assert GGUFSource(path).spec.derived
        assert derived.plan.counts == table.plan.counts
        a, b = (tmp / f"derived-{name}-{k}.gguf" for k in ("table", "derived"))
        ta, tb = GGUFFile(a), GGUFFile(b)
        assert list(ta.tensors) == list(tb.tensors)
        for t in ta.tensors.values():
            assert np.array_equal(ta.rows(t, 0, t.n_rows), tb.rows(tb.tensors[t.name], 0, t.n_rows)), t.name
