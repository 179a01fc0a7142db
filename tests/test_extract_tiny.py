"""`refusal-edit extract` end to end on a tiny model: artifacts, provenance and error paths."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

from refusal_edit.directions.artifacts import load_direction

FAST = ["--n-train", "6", "--n-val", "4", "--batch-size", "8", "--top-k", "2"]
PERMISSIVE = ["--kl-threshold", "1e9", "--induce-threshold", "-1e9", "--refusal-tokens", "i,as"]


def test_extract_writes_direction_and_provenance(tiny_dir, tmp_path, cli):
    src = tiny_dir("qwen2")
    out = tmp_path / "run"
    res = cli("extract", src, "--out", out, *FAST, *PERMISSIVE)
    assert res.code == 0, res.text
    assert "selected refusal direction" in res.out  # results on stdout
    d = load_direction(out / "direction.safetensors")
    assert d.direction.shape == (32,) and d.direction.dtype == torch.float32
    assert abs(d.direction.norm().item() - 1) < 1e-6
    assert torch.allclose(d.direction, d.mean_diff / d.mean_diff.norm())
    with safe_open(str(out / "direction.safetensors"), "pt") as fh:
        meta = fh.metadata()
    assert meta["model"] == "model" and int(meta["layer"]) in range(3) and int(meta["position"]) in (-2, -1)
    run = json.loads((out / "run.json").read_text())
    assert run["chat_format"]["post_instruction_tokens"] == ["<|end|>", "<|assistant|>"]
    assert run["chat_format"]["system_prompt"] == "(model default)"
    assert run["prompts"]["harmful_val"]["count"] == 4 and len(run["prompts"]["harmful_train"]["sha256"]) == 64
    assert run["refusal_tokens"]["source"] == "user"
    assert set(run["versions"]) >= {"torch", "transformers", "refusal_edit"}
    assert run["selection"]["method"] == "fast" and run["selection"]["evaluated"] >= 2
    cands = json.loads((out / "candidates.json").read_text())
    assert len(cands["candidates"]) == 2 * 3  # positions x layers
    scored = [c for c in cands["candidates"] if c["bypass"] is not None]
    assert len(scored) == run["selection"]["evaluated"]
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_exhaustive_scores_every_candidate(tiny_dir, tmp_path, cli):
    src = tiny_dir("llama")
    res = cli("extract", src, "--out", tmp_path / "run", "--exhaustive", *FAST, *PERMISSIVE)
    assert res.code == 0, res.text
    cands = json.loads((tmp_path / "run" / "candidates.json").read_text())["candidates"]
    assert all(c["bypass"] is not None for c in cands)
    late = [c for c in cands if c["layer"] >= 2]  # int(3 * 0.8) = 2: the last layer is pruned
    assert late and all(c["discarded"] == "late layer" for c in late)


def test_system_prompt_is_used_and_recorded(tiny_dir, tmp_path, cli):
    src = tiny_dir("llama")
    res = cli("extract", src, "--out", tmp_path / "run", "--system-prompt", "be safe", *FAST, *PERMISSIVE)
    assert res.code == 0, res.text
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["chat_format"]["system_prompt"] == "be safe"
    assert "be safe" in run["chat_format"]["example"]


def test_extract_errors(tiny_dir, tmp_path, cli):
    src = tiny_dir("llama")
    (tmp_path / "empty.txt").write_text("")
    res = cli("extract", src, "--harmful", tmp_path / "empty.txt", "--out", tmp_path / "r1")
    assert res.code == 1 and "empty prompt set" in res.err
    res = cli("extract", tmp_path / "nowhere", "--out", tmp_path / "r2")
    assert res.code == 1 and "model not found" in res.err
    strict = ["--kl-threshold", "-1", "--refusal-tokens", "i", "--strict"]
    res = cli("extract", src, "--out", tmp_path / "r3", *FAST, *strict)
    assert res.code == 1 and "every candidate was filtered out (kl:" in res.err
    assert not (tmp_path / "r3").exists()
    (tmp_path / "r4").mkdir()
    res = cli("extract", src, "--out", tmp_path / "r4", *FAST, *PERMISSIVE)
    assert res.code == 1 and "output exists" in res.err


def test_model_without_chat_template(tmp_path, cli):
    from tiny import build, save, tokenizer

    src = save(build("llama"), tmp_path / "m", with_tokenizer=False)
    tokenizer(chat_template=None).save_pretrained(src)
    res = cli("extract", src, "--out", tmp_path / "run", *FAST, *PERMISSIVE)
    assert res.code == 1 and "no chat template; pass --template FILE" in res.err
    (tmp_path / "t.jinja").write_text("{% for m in messages %}q: {{ m['content'] }}{% endfor %} a:")
    res = cli("extract", src, "--out", tmp_path / "run", "--template", tmp_path / "t.jinja", *FAST, *PERMISSIVE)
    assert res.code == 0, res.text


def test_extract_compares_its_pick_with_the_recipes_measured_result(tiny_dir, tmp_path, cli, monkeypatch):
    import refusal_edit.loading as loading
    from refusal_edit.recipes import Recipe

    src = tiny_dir("qwen2")
    result: dict = {}
    real = loading.resolve_source

    def with_recipe(spec, *args, **kwargs):
        source = real(spec, *args, **kwargs)
        source.recipe = Recipe(name="toy", path=tmp_path / "toy.toml", result=result)
        return source

    monkeypatch.setattr(loading, "resolve_source", with_recipe)
    res = cli("extract", src, "--out", tmp_path / "run1", *FAST, *PERMISSIVE)
    assert res.code == 0, res.text
    assert "recipe's measured result" not in res.err  # the recipe records none yet
    d = load_direction(tmp_path / "run1" / "direction.safetensors")

    result.update(layer=d.layer, position=d.position)
    res = cli("extract", src, "--out", tmp_path / "run2", *FAST, *PERMISSIVE)
    assert f"recipe's measured result: layer {d.layer}, position {d.position} (the same candidate)" in res.err

    result.update(layer=99)
    res = cli("extract", src, "--out", tmp_path / "run3", *FAST, *PERMISSIVE)
    assert res.code == 0, res.text
    assert f"recipe's measured result: layer 99, position {d.position} (differs:" in res.err


def test_extract_never_dead_ends_it_relaxes_and_records(tiny_dir, tmp_path, cli):
    """Filters nothing passes: without --strict the filters are relaxed by the documented rule, said in one
    line and recorded in run.json (issue 11: a new user's first run must finish with a direction)."""
    src = tiny_dir("llama")
    impossible = ["--kl-threshold", "0", "--induce-threshold", "1e9", "--refusal-tokens", "i"]
    res = cli("extract", src, "--out", tmp_path / "run", *FAST, *impossible)
    assert res.code == 0, res.text
    assert "no candidate passed KL <= 0, induce >= 1e+09" in res.err and "recorded in run.json" in res.err
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    relaxed = run["selection"]["relaxed"]
    assert relaxed["from"] == {"kl_threshold": 0.0, "induce_threshold": 1e9}
    assert relaxed["steps"] == 5 and relaxed["to"]["kl_threshold"] is None  # nothing passes: filters off
    assert "doubles the KL threshold" in relaxed["rule"]
    assert load_direction(tmp_path / "run" / "direction.safetensors").layer == run["chosen"]["layer"]
