"""`refusal-edit push` against a fake Hub on 127.0.0.1 (tests/hub_server.py): what arrives, and every refusal.

Each push runs the real CLI entry point with HF_ENDPOINT pointing at the fake server, uploads inline
(HF_HUB_DISABLE_XET=1, `uploadMode: regular`) and HF_HOME in a temp dir, so no real login cache or Hub is
ever involved. A distinctive token must reach the server in the Authorization header and never appear
in anything the command prints.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hub_server import FakeHub, User, front_matter
from tiny import build, save

from refusal_edit.checkpoint.atomic import TMP_MARK
from refusal_edit.checkpoint.card import render_card
from refusal_edit.directions.artifacts import load_direction, save_direction
from refusal_edit.edits import orthogonalize
from refusal_edit.errors import RefusalEditError
from refusal_edit.hub import NO_TOKEN, check_folder, push_folder, resolve_endpoint, resolve_token

TOKEN = "hf_FAKEtok3n_q7Zx9Lm2Pw4Rt8Vb"  # distinctive: any leak into output is unmistakable
READ_TOKEN = "hf_READonly_k3Jh5Gf7Ds9Aa1"
WRONG_TOKEN = "hf_WRONGtok_u8Yt6Re4Wq2Zx0"


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def edited(tmp_path_factory) -> dict[str, Path]:
    """Two real edited checkpoints of a tiny llama: one file, and sharded with an index."""
    root = tmp_path_factory.mktemp("edited")
    src = save(build("llama"), root / "model")
    torch.manual_seed(3)
    save_direction(root / "direction.safetensors", torch.randn(32), {"layer": 1, "position": -1, "model": "tiny"})
    d = load_direction(root / "direction.safetensors")
    orthogonalize(src, d, root / "single", base_model="org/base")
    orthogonalize(src, d, root / "sharded", base_model="org/base", max_shard_size="20KB")
    return {"single": root / "single", "sharded": root / "sharded"}


@pytest.fixture
def folder(edited, tmp_path) -> Path:
    return Path(shutil.copytree(edited["single"], tmp_path / "tiny-abliterated"))


@pytest.fixture
def sharded(edited, tmp_path) -> Path:
    return Path(shutil.copytree(edited["sharded"], tmp_path / "tiny-sharded"))


def _isolate(monkeypatch, tmp_path: Path, endpoint: str) -> None:
    """Point huggingface_hub at `endpoint`, with no token anywhere and nothing read from the user's home."""
    import huggingface_hub.constants as hf

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "hf-home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    # huggingface_hub reads these at import (conftest sets HF_HUB_OFFLINE=1 for the rest of the suite).
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(hf, "ENDPOINT", endpoint)
    monkeypatch.setattr(hf, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(hf, "AGENT_HARNESSES_PATH", str(home / ".agent_harnesses.json"), raising=False)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    users = {
        TOKEN: User("alice", {"acme": "write", "readers": "read"}),
        READ_TOKEN: User("alice", role="read"),
    }
    with FakeHub(users) as server:
        _isolate(monkeypatch, tmp_path, server.url)
        yield server


def snapshot(root: Path) -> dict[str, tuple]:
    """Everything observable about a folder: names, sizes, mtimes, bytes (and directory mtimes)."""
    state: dict[str, tuple] = {".": ("dir", root.stat().st_mtime_ns)}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        st = p.stat()
        if p.is_dir():
            state[rel] = ("dir", st.st_mtime_ns)
        else:
            state[rel] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return state


def model_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def flat(text: str) -> str:
    return " ".join(text.split())


def assert_token_safe(result, *tokens: str) -> None:
    for token in (TOKEN, *tokens):
        assert token not in result.text


def add_strays(folder: Path) -> None:
    (folder / ".cache" / "huggingface" / "upload").mkdir(parents=True)
    (folder / ".cache" / "huggingface" / "upload" / "model.safetensors.metadata").write_text("x")
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "m.cpython-311.pyc").write_bytes(b"\0pyc")
    tmp = folder / f"tiny-abliterated{TMP_MARK}3f2a9c1d"
    tmp.mkdir()
    shutil.copy(folder / "model.safetensors", tmp / "model.safetensors")
    (folder / ".DS_Store").write_bytes(b"junk")
    (folder / ".env").write_text("SECRET=1")
    (folder / "model.safetensors.lock").write_text("")
    (folder / "model.safetensors.part").write_bytes(b"partial")
    (folder / "download.tmp").write_bytes(b"t")
    (folder / "pytorch_model.bin").write_bytes(b"unedited pickle")


# ----------------------------------------------------------------------------------------------- uploads


def test_push_uploads_exactly_the_model_files_privately(folder, hub, cli, monkeypatch):
    expected = model_files(folder)
    (folder / "extra").mkdir()
    (folder / "extra" / "notes.txt").write_text("kept: user content in a subfolder goes up\n")
    expected["extra/notes.txt"] = (folder / "extra" / "notes.txt").read_bytes()
    add_strays(folder)
    before = snapshot(folder)
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    result = cli("push", folder, "--repo", "alice/tiny-abliterated")

    assert result.code == 0, result.text
    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert (commit.repo_id, commit.revision) == ("alice/tiny-abliterated", "main")
    assert set(commit.files) == set(expected)  # no temp dir, cache, lock, partial, hidden or pickle file
    for name, data in expected.items():
        assert commit.files[name] == data, name
    assert hub.repos["alice/tiny-abliterated"].branches["main"]["model.safetensors"] == expected["model.safetensors"]

    (create,) = hub.hits("POST /api/repos/create")
    assert create.json == {"name": "tiny-abliterated", "organization": "alice", "visibility": "private"}
    assert hub.repos["alice/tiny-abliterated"].private
    assert hub.hits() and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.hits())
    assert_token_safe(result)

    meta = yaml.safe_load(front_matter(commit.files["README.md"].decode()))
    assert meta["base_model"] == "org/base"
    assert {"refusal-edit", "abliterated"} <= set(meta["tags"])
    text = flat(result.text)
    assert "skipped pytorch_model.bin" in text
    assert "private, new repo" in text
    assert snapshot(folder) == before


def test_public_revision_and_commit_message(folder, hub, cli):
    result = cli(
        "push", folder, "--repo", "acme/tiny", "--public", "--revision", "dev",
        "--commit-message", "first edit", "--token", TOKEN,
    )  # fmt: skip

    assert result.code == 0, result.text
    (create,) = hub.hits("POST /api/repos/create")
    assert create.json["visibility"] == "public" and create.json["organization"] == "acme"
    assert [r.path for r in hub.hits("POST /api/models/acme/tiny/branch/")] == ["/api/models/acme/tiny/branch/dev"]
    (commit,) = hub.commits
    assert (commit.repo_id, commit.revision, commit.summary) == ("acme/tiny", "dev", "first edit")
    repo = hub.repos["acme/tiny"]
    assert not repo.private
    assert "model.safetensors" in repo.branches["dev"] and "model.safetensors" not in repo.branches["main"]
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.hits())
    assert_token_safe(result)


def test_sharded_checkpoint_with_generated_card(sharded, hub, cli, monkeypatch):
    (sharded / "README.md").unlink()
    expected = model_files(sharded)
    record = json.loads((sharded / "refusal_edit.json").read_text())
    before = snapshot(sharded)
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    result = cli("push", sharded, "--repo", "tiny-sharded")  # bare name: the token owner's namespace

    assert result.code == 0, result.text
    (commit,) = hub.commits
    assert commit.repo_id == "alice/tiny-sharded"
    index = json.loads(expected["model.safetensors.index.json"])
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and shards <= set(commit.files)
    assert set(commit.files) == set(expected) | {"README.md"}
    assert all(commit.files[n] == data for n, data in expected.items())
    assert commit.files["README.md"] == render_card(record).encode()
    meta = yaml.safe_load(front_matter(commit.files["README.md"].decode()))
    assert meta["base_model"] == "org/base" and {"refusal-edit", "abliterated"} <= set(meta["tags"])
    (validate,) = hub.hits("POST /api/validate-yaml")
    assert validate.json["content"] == render_card(record)
    assert not (sharded / "README.md").exists()  # generated in memory only
    assert snapshot(sharded) == before


def test_token_from_login_cache(folder, hub, cli, tmp_path):
    Path(os.environ["HF_HOME"], "token").write_text(TOKEN + "\n")
    result = cli("push", folder, "--repo", "alice/cached")
    assert result.code == 0, result.text
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.hits())
    assert_token_safe(result)


def test_existing_repo_is_accepted_and_unchanged_files_are_not_recommitted(folder, hub, cli, monkeypatch):
    hub.add_repo("alice/existing", private=True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    first = cli("push", folder, "--repo", "alice/existing")
    assert first.code == 0, first.text
    assert [r.route for r in hub.hits("POST /api/repos/create")] == ["POST /api/repos/create"]  # answered 409
    assert "existing repo" in flat(first.text)
    assert len(hub.commits) == 1

    again = cli("push", folder, "--repo", "alice/existing")
    assert again.code == 0, again.text
    assert "nothing to commit" in flat(again.text)
    assert len(hub.commits) == 1


def test_existing_public_repo_needs_public(folder, hub, cli, monkeypatch):
    hub.add_repo("alice/open", private=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    refused = cli("push", folder, "--repo", "alice/open")
    assert refused.code == 1
    assert "alice/open already exists and is public: pass --public" in flat(refused.text)
    assert hub.commits == []

    allowed = cli("push", folder, "--repo", "alice/open", "--public")
    assert allowed.code == 0, allowed.text
    assert len(hub.commits) == 1


def test_dry_run_contacts_nothing(folder, hub, cli):
    (folder / "README.md").unlink()
    add_strays(folder)
    before = snapshot(folder)

    result = cli("push", folder, "--repo", "alice/tiny", "--dry-run")  # no token anywhere: not needed

    assert result.code == 0, result.text
    assert hub.requests == []
    text = flat(result.text)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "refusal_edit.json", "README.md"):
        assert name in text
    assert "133.55 KB" in text  # sizes
    assert "README.md (generated from refusal_edit.json)" in text
    assert "base_model: org/base" in result.text and "- abliterated" in result.text
    assert "skipped pytorch_model.bin" in text and TMP_MARK in text
    assert "nothing was contacted" in text
    assert snapshot(folder) == before


# ----------------------------------------------------------------------------------------------- refusals


def test_no_token(folder, hub, cli):
    result = cli("push", folder, "--repo", "alice/tiny")
    assert result.code == 1
    assert NO_TOKEN in flat(result.text)
    assert "Traceback" not in result.text
    assert hub.hits() == []


def test_invalid_token(folder, hub, cli):
    result = cli("push", folder, "--repo", "alice/tiny", "--token", WRONG_TOKEN)
    assert result.code == 1
    assert f"the Hub at {hub.url} rejected the token (401 Unauthorized)" in flat(result.text)
    (whoami,) = hub.hits()
    assert whoami.headers["authorization"] == f"Bearer {WRONG_TOKEN}"
    assert_token_safe(result, WRONG_TOKEN)
    assert hub.commits == []


def test_read_only_token(folder, hub, cli):
    result = cli("push", folder, "--repo", "alice/tiny", "--token", READ_TOKEN)
    assert result.code == 1
    assert "the token is read-only" in flat(result.text)
    assert hub.hits("POST") == []
    assert_token_safe(result, READ_TOKEN)


def test_unreachable_endpoint(folder, hub, cli, monkeypatch, tmp_path):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    _isolate(monkeypatch, tmp_path, dead)
    result = cli("push", folder, "--repo", "alice/tiny", "--token", TOKEN)
    assert result.code == 1
    assert f"cannot reach the Hub at {dead}" in flat(result.text)
    assert "Traceback" not in result.text
    assert_token_safe(result)


def test_offline_mode(folder, hub, cli, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = cli("push", folder, "--repo", "alice/tiny", "--token", TOKEN)
    assert result.code == 1
    assert "offline mode is on (HF_HUB_OFFLINE)" in flat(result.text)
    assert hub.requests == []


@pytest.mark.parametrize(
    ("repo", "why"),
    [
        ("bob/model", "the token belongs to alice, who is not a member of bob"),  # whoami says so: no request
        ("readers/new-model", "create repo: 403 Forbidden"),  # org where alice only reads: create refused
        ("readers/shared", "commit: 403 Forbidden"),  # visible existing repo: create refused, then the upload
    ],
)
def test_repo_owned_by_someone_else(folder, hub, cli, repo, why):
    hub.add_repo("readers/shared", private=True)
    before = snapshot(folder)
    result = cli("push", folder, "--repo", repo, "--token", TOKEN)
    assert result.code == 1
    text = flat(result.text)
    assert f"you cannot write to {repo}" in text and why in text
    assert hub.commits == []
    assert "Traceback" not in result.text
    assert_token_safe(result)
    assert snapshot(folder) == before


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("config.json", "no config.json"),
        ("model.safetensors", "no safetensors weights"),
        ("tokenizer.json", "missing tokenizer (tokenizer.json or tokenizer.model)"),
        ("tokenizer_config.json", "missing tokenizer_config.json"),
        ("refusal_edit.json", "missing refusal_edit.json"),
    ],
)
def test_incomplete_folder(folder, hub, cli, remove, message):
    (folder / remove).unlink()
    result = cli("push", folder, "--repo", "alice/tiny", "--token", TOKEN)
    assert result.code == 1
    assert message in flat(result.text)
    assert hub.requests == []  # checked before anything is contacted


def test_incomplete_sharded_folder(sharded, hub, cli):
    (sharded / "model-00003-of-00007.safetensors").unlink()
    result = cli("push", sharded, "--repo", "alice/tiny", "--token", TOKEN)
    assert result.code == 1
    assert "missing shard model-00003-of-00007.safetensors" in flat(result.text)
    assert hub.requests == []


def test_truncated_or_unindexed_weights(sharded, folder, hub, cli):
    shutil.copy(folder / "model.safetensors", sharded / "model.safetensors")
    result = cli("push", sharded, "--repo", "alice/tiny", "--token", TOKEN)
    assert result.code == 1 and "model.safetensors in" in flat(result.text) and "remove it" in flat(result.text)

    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    result = cli("push", folder, "--repo", "alice/tiny", "--token", TOKEN)
    assert result.code == 1 and "truncated safetensors file model.safetensors" in flat(result.text)
    assert hub.requests == []


@pytest.mark.parametrize(
    ("card", "message"),
    [
        ("# A model\n\nNo metadata here.\n", "README.md has no YAML metadata block"),
        ("---\nlibrary_name: transformers\n---\n# x\n", "README.md metadata lacks base_model"),
        ("---\ntags: [refusal-edit\n---\n# x\n", "README.md metadata is not valid YAML"),
        (
            "---\nbase_model: org/base\nbase_model_relation: finetune\nlibrary_name: transformers\n"
            "pipeline_tag: text-generation\ntags: [refusal-edit]\n---\n",
            "tags must include abliterated",
        ),
        (
            "---\nbase_model: /home/me/models/base\nbase_model_relation: finetune\nlibrary_name: transformers\n"
            "pipeline_tag: text-generation\ntags: [refusal-edit, abliterated]\n---\n",
            "base_model '/home/me/models/base' is not a Hub model id",
        ),
    ],
)
def test_invalid_card_metadata(folder, hub, cli, card, message):
    (folder / "README.md").write_text(card)
    result = cli("push", folder, "--repo", "alice/tiny", "--token", TOKEN)
    assert result.code == 1
    assert message in flat(result.text)
    assert hub.requests == []


def test_hub_rejects_card_metadata(folder, hub, cli):
    hub.reject_card = '"base_model" must be the id of an existing model'
    result = cli("push", folder, "--repo", "alice/tiny", "--token", TOKEN)
    assert result.code == 1
    assert 'the Hub rejected the model card metadata: "base_model" must be the id' in flat(result.text)
    assert hub.commits == [] and hub.hits("POST /api/models/alice/tiny/commit") == []


def test_failed_upload_leaves_folder_untouched(folder, hub, cli):
    (folder / "README.md").unlink()  # the generated card must not be written either
    add_strays(folder)
    before = snapshot(folder)
    hub.fail_commit = (500, "storage backend unavailable")

    result = cli("push", folder, "--repo", "alice/tiny", "--token", TOKEN)

    assert result.code == 1
    assert "HTTP 500: storage backend unavailable" in flat(result.text)
    assert len(hub.hits("POST /api/models/alice/tiny/commit/main")) == 1 and hub.commits == []
    assert snapshot(folder) == before
    assert_token_safe(result)


def test_invalid_repo_id_and_revision(folder, hub, cli):
    result = cli("push", folder, "--repo", "a/b/c", "--token", TOKEN)
    assert result.code == 1 and "invalid repo id 'a/b/c'" in flat(result.text)
    result = cli("push", folder, "--repo", "alice/x", "--revision", "0" * 40, "--token", TOKEN)
    assert result.code == 1 and "--revision must name a branch" in flat(result.text)
    assert hub.requests == []


# ----------------------------------------------------------------------------------------------- library + script


def test_library_api(folder, hub, monkeypatch, tmp_path):
    add_strays(folder)
    plan = check_folder(folder)
    assert "README.md" in plan.names() and not plan.card_generated
    assert "pytorch_model.bin" not in plan.names()
    skipped = dict(plan.skipped)
    assert f"tiny-abliterated{TMP_MARK}3f2a9c1d/" in skipped and ".cache/" in skipped and "__pycache__/" in skipped
    assert plan.total_bytes == sum((folder / n).stat().st_size for n in plan.names())

    dry = push_folder(folder, "alice/lib", dry_run=True, plan=plan)
    assert dry.dry_run and dry.private and hub.requests == []

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the explicit endpoint wins over the variable
    result = push_folder(folder, "alice/lib", token=TOKEN, endpoint=hub.url)
    assert result.created and result.private and result.commit_oid == hub.commits[0].oid
    assert result.url == f"{hub.url}/alice/lib" and TOKEN not in repr(result)

    with pytest.raises(RefusalEditError, match="no Hugging Face token"):
        resolve_token(None)
    token_file = tmp_path / "elsewhere" / "token"
    token_file.parent.mkdir()
    token_file.write_text("from-file\n")
    monkeypatch.setenv("HF_TOKEN_PATH", str(token_file))
    assert resolve_token(None) == "from-file"
    monkeypatch.setenv("HF_TOKEN", "from-env")
    assert resolve_token(None) == "from-env"
    assert resolve_token(" explicit ") == "explicit"
    assert resolve_endpoint("https://hub.example.com/") == "https://hub.example.com"
    monkeypatch.delenv("HF_ENDPOINT")
    assert resolve_endpoint() == "https://huggingface.co"


def test_console_script(folder, hub, tmp_path):
    """The installed `refusal-edit` reads HF_ENDPOINT at startup like any huggingface_hub program."""
    script = Path(sys.executable).with_name("refusal-edit")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE", "TRANSFORMERS_OFFLINE"))}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "script-home"), HF_TOKEN=TOKEN)

    ok = subprocess.run([script, "push", folder, "--repo", "alice/script"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert [c.repo_id for c in hub.commits] == ["alice/script"]
    assert TOKEN not in ok.stdout + ok.stderr

    bad = subprocess.run([script, "push", folder, "--repo", "bob/x"], env=env, capture_output=True, text=True)
    assert bad.returncode == 1
    assert "error: you cannot write to bob/x" in flat(bad.stderr)
    assert "Traceback" not in bad.stderr and TOKEN not in bad.stdout + bad.stderr
