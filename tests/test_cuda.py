"""The same pipeline on a CUDA device (skipped without one): results match the CPU run."""

from __future__ import annotations

import pytest
import torch
from tiny import build, save, token_batch

from refusal_edit.directions.extract import ExtractSettings
from refusal_edit.directions.select import SelectionSettings
from refusal_edit.interventions import ablation, addition
from refusal_edit.loading import load_model
from refusal_edit.prompts import builtin, chat_format
from refusal_edit.workflows import run_extract

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def settings() -> ExtractSettings:
    return ExtractSettings(
        n_train=6,
        n_val=4,
        batch_size=8,
        refusal_tokens=["i", "as"],
        selection=SelectionSettings(kl_threshold=1e9, induce_threshold=-1e9, top_k=2, batch_size=8),
    )


def short(kind: str):
    ps = builtin(kind)
    ps.instructions = [t[:40] for t in ps.instructions]  # the tiny models have 128 positions
    return ps


def test_hooks_on_cuda_match_cpu():
    model = build("gemma2")
    x = token_batch()
    torch.manual_seed(3)
    r = torch.randn(32)
    with torch.no_grad(), ablation(model, r):
        cpu = model(x).logits
    with torch.no_grad(), addition(model, r, 1, coeff=2.0, site="attn"):
        cpu_add = model(x).logits
    model.cuda()
    with torch.no_grad(), ablation(model, r):
        gpu = model(x.cuda()).logits.cpu()
    with torch.no_grad(), addition(model, r, 1, coeff=2.0, site="attn"):
        gpu_add = model(x.cuda()).logits.cpu()
    assert (gpu - cpu).abs().max() < 1e-3 and (gpu_add - cpu_add).abs().max() < 1e-3


def test_extract_on_cuda_selects_what_cpu_selects(tmp_path):
    src = save(build("qwen2"), tmp_path / "m")
    results = {}
    for device in ("cpu", "cuda"):
        lm = load_model(str(src), device=device)
        assert next(lm.model.parameters()).device.type == device
        fmt = chat_format(lm.tokenizer)
        res = run_extract(lm, fmt, short("harmful"), short("harmless"), settings(), tmp_path / f"run-{device}")
        results[device] = res
    a, b = results["cpu"].selection.chosen, results["cuda"].selection.chosen
    assert (a.position, a.layer) == (b.position, b.layer)
    assert abs(a.bypass - b.bypass) < 1e-2
    va = results["cpu"].candidates.mean_diff
    vb = results["cuda"].candidates.mean_diff
    assert torch.nn.functional.cosine_similarity(va.flatten(), vb.flatten(), dim=0) > 0.999
