"""`--load-in 4bit|8bit` (bitsandbytes) for extract, tune and evaluate: on the CPU where the installed
bitsandbytes runs there (0.47+), a one-line refusal where it is missing or cannot run; never for orthogonalize."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import make_direction
from test_devices import machine
from tiny import token_batch

from refusal_edit.edits.memory import edited_weights
from refusal_edit.edits.spec import DirectionBank, EditSpec, full_ablation, resolve
from refusal_edit.errors import RefusalEditError
from refusal_edit.interventions import edit_hooks
from refusal_edit.loading import quantize
from refusal_edit.loading.model import load_model

FAST_EXTRACT = ["--n-train", "4", "--n-val", "2", "--batch-size", "4", "--top-k", "1"]
PERMISSIVE = ["--kl-threshold", "1e9", "--induce-threshold", "-1e9", "--refusal-tokens", "i,as"]
FAST_EVAL = ["--n-test", "2", "--max-new-tokens", "2", "--samples", "0", "--borderline", "none"]


def runs_on_cpu(load_in: str) -> bool:
    return not quantize._cannot_run(load_in, "cpu")


needs_bnb = pytest.mark.skipif(not runs_on_cpu("4bit"), reason="bitsandbytes missing or without a CPU backend")


@pytest.fixture
def no_probe_cache():
    quantize._cannot_run.cache_clear()
    yield
    quantize._cannot_run.cache_clear()


@needs_bnb
@pytest.mark.parametrize("load_in", ["4bit", "8bit"])
def test_hooks_remove_the_direction_from_a_quantized_model(tiny_dir, load_in):
    """The quantized model is what extract, tune and evaluate run: the ablation hooks leave no r component in
    any hidden state of it, as on the full-precision model."""
    lm = load_model(str(tiny_dir("qwen2")), device="cpu", load_in=load_in)
    assert lm.load_in == load_in and lm.model.is_quantized
    assert (
        type(lm.model.model.layers[0].mlp.down_proj).__name__ == {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}[load_in]
    )
    r = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(3)), dim=0)
    x = token_batch()
    with torch.no_grad():
        before = lm.model(x, output_hidden_states=True).hidden_states
        with edit_hooks(lm.model, full_ablation(r, 3)):
            after = lm.model(x, output_hidden_states=True).hidden_states
    for h0, h in zip(before[:-1], after[:-1], strict=True):  # the last one is after the final norm
        assert (h.float() @ r).abs().max().item() <= 1e-4 * h.float().norm(dim=-1).max().item()
        assert (h0.float() @ r).abs().max().item() > 1e-2  # there was something to remove
    # Norm preservation edits weights in memory: not on quantized ones.
    edit = resolve(EditSpec(preserve_norm=True), DirectionBank(r), 3)
    with pytest.raises(RefusalEditError, match="quantized"), edited_weights(lm.model, edit):
        pass


@needs_bnb
def test_extract_and_evaluate_in_4bit_on_the_cpu(tiny_dir, tmp_path, cli, monkeypatch):
    """Also the CLI's default device, auto, saying what it picked (a machine without a GPU, monkeypatched)."""
    machine(monkeypatch, cuda=0, mps=False)
    src = tiny_dir("qwen2")
    res = cli("extract", src, "--out", tmp_path / "d", "--load-in", "4bit", *FAST_EXTRACT, *PERMISSIVE)
    assert res.code == 0, res.text
    said = "device auto: cpu (no CUDA or MPS device); loaded in 4bit by bitsandbytes (computing in float32)"
    assert said in res.err
    run = json.loads((tmp_path / "d" / "run.json").read_text())
    assert run["load_in"] == "4bit" and run["device"] == "cpu"
    res = cli("evaluate", src, "--direction", tmp_path / "d", "--out", tmp_path / "r", "--load-in", "8bit", *FAST_EVAL)
    assert res.code == 0, res.text
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["base"]["load_in"] == "8bit"


def test_orthogonalize_never_takes_it(tiny_dir, tmp_path, cli):
    d = make_direction(tmp_path / "d.safetensors").path
    res = cli("orthogonalize", tiny_dir("qwen2"), "--direction", d, "--out", tmp_path / "o", "--load-in", "4bit")
    assert res.code == 2 and "No such option" in res.err and not (tmp_path / "o").exists()


def test_missing_bitsandbytes_is_one_line(tiny_dir, tmp_path, cli, monkeypatch, no_probe_cache):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    res = cli("extract", tiny_dir("qwen2"), "--out", tmp_path / "d", "--load-in", "4bit", *FAST_EXTRACT)
    assert res.code == 1 and "Traceback" not in res.text
    assert "error: --load-in 4bit needs bitsandbytes, an optional extra: pip install 'refusal-edit[quant]'" in res.err
    assert not (tmp_path / "d").exists()


@needs_bnb
def test_bitsandbytes_that_cannot_run_here_is_refused(tiny_dir, monkeypatch, no_probe_cache):
    import bitsandbytes

    def no_backend(*args, **kwargs):
        raise RuntimeError("no kernel for this device\nmore")

    monkeypatch.setattr(bitsandbytes.functional, "quantize_4bit", no_backend)
    with pytest.raises(RefusalEditError, match=r"`load_in` 4bit bitsandbytes .* cannot run 4bit layers on cpu "
                       r"\(no kernel for this device\): use a CUDA GPU"):  # fmt: skip
        load_model(str(tiny_dir("qwen2")), device="cpu", load_in="4bit")


def test_bad_values_and_combinations(tiny_dir):
    src = str(tiny_dir("qwen2"))
    with pytest.raises(RefusalEditError, match=r"unknown `load_in` '3bit' \(4bit, 8bit\)"):
        load_model(src, load_in="3bit")
    with pytest.raises(RefusalEditError, match="`max_memory` and `offload_dir` do not apply with `load_in`"):
        load_model(src, device="auto", load_in="4bit", max_memory="cpu=1GiB")


@needs_bnb
def test_tune_leaves_norm_preservation_out_of_the_search_in_4bit(tiny_dir, tmp_path, cli, monkeypatch):
    import refusal_edit.workflows.tune as wf

    def stop(*args, **kwargs):
        raise RefusalEditError("stopped once the model was loaded")

    monkeypatch.setattr(wf, "chat_format", stop)
    d = make_direction(tmp_path / "d.safetensors").path
    res = cli("tune", tiny_dir("qwen2"), "--direction", d, "--out", tmp_path / "t", "--load-in", "4bit")
    assert "stopped once the model was loaded" in res.err
    text = " ".join(res.text.split())
    assert "rewrite weights in memory, and this model is loaded in 4bit: they are left out" in text
