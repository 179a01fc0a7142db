"""`refusal-edit push`: what would go up, what arrives, and every refusal.

The Hub is faked at huggingface_hub's public seams: `FakeHub` replaces the `HfApi` methods push calls
(whoami, repo_info, create_repo, create_branch, get_paths_info, create_commit) and raises the client's
public error types, so nothing depends on its transport or private attributes. Token and endpoint come
from `huggingface_hub.constants` / `get_token()`, pointed at a temp dir. A distinctive token must reach
the client and never appear in anything the command prints.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from tiny import build, save

from refusal_edit.checkpoint.atomic import TMP_MARK
from refusal_edit.checkpoint.card import render_card
from refusal_edit.checkpoint.record import RECORD, EditRecord
from refusal_edit.errors import RefusalEditError
from refusal_edit.hub import NO_TOKEN, check_folder, push_folder, resolve_endpoint, resolve_token
from refusal_edit.hub.plan import pickle_reason
from refusal_edit.workflows.planning import save_record

TOKEN = "hf_FAKEtok3n_q7Zx9Lm2Pw4Rt8Vb"  # distinctive: any leak into output is unmistakable
READ_TOKEN = "hf_READonly_k3Jh5Gf7Ds9Aa1"
WRONG_TOKEN = "hf_WRONGtok_u8Yt6Re4Wq2Zx0"
ENDPOINT = "https://hub.test"


# ----------------------------------------------------------------------------------------------- fake Hub


@dataclass
class User:
    name: str
    orgs: dict[str, str] = field(default_factory=dict)  # org -> role in it: admin | write | read
    role: str = "write"  # token role


@dataclass
class Commit:
    repo_id: str
    revision: str
    summary: str
    files: dict[str, bytes]


class TransportError(Exception):
    """Stands in for the HTTP stack's network failure (matched by class name, as push does)."""


def http_error(status: int, message: str, kind: str = "HfHubHTTPError") -> Exception:
    from huggingface_hub import errors

    response = SimpleNamespace(status_code=status, headers={}, request=None)
    return getattr(errors, kind)(message, response=response, server_message=message)


class FakeHub:
    """Repos, branches and file bytes in memory; permissions as on the Hub; every call recorded."""

    def __init__(self, users: dict[str, User]) -> None:
        self.users = users
        self.repos: dict[str, dict] = {}  # id -> {"private": bool, "branches": {name: {path: bytes}}}
        self.calls: list[tuple[str, str, str]] = []  # (method, token, endpoint)
        self.commits: list[Commit] = []
        self.reject_card: str | None = None
        self.fail_commit: tuple[int, str] | None = None
        self.down = False

    def add_repo(self, repo_id: str, private: bool = True) -> None:
        self.repos[repo_id] = {"private": private, "branches": {"main": {".gitattributes": b"*.safetensors lfs\n"}}}

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def _call(self, api, name: str, repo_id: str = "", need: str = "") -> tuple[User, dict | None]:
        """Record the call; answer as the Hub: 401 bad token, 404 invisible repo, 403 no write access."""
        self.calls.append((name, api.token, api.endpoint))
        if self.down:
            raise TransportError("[Errno 111] Connection refused")
        if api.token not in self.users:
            raise http_error(401, "Invalid credentials in Authorization header")
        user, repo, ns = self.users[api.token], self.repos.get(repo_id), repo_id.split("/")[0]
        if need in ("see", "write") and (repo is None or (repo["private"] and ns not in (user.name, *user.orgs))):
            raise http_error(404, "Repository not found", "RepositoryNotFoundError")
        if need in ("create", "write") and (user.role != "write" or (ns != user.name and user.orgs.get(ns) != "write")):
            raise http_error(403, f"You don't have write access to {ns}")
        return user, repo

    def whoami(self, api):
        u, _ = self._call(api, "whoami")
        orgs = [{"name": o, "roleInOrg": r} for o, r in u.orgs.items()]
        return {"type": "user", "name": u.name, "orgs": orgs, "auth": {"accessToken": {"role": u.role}}}

    def repo_info(self, api, repo_id, **kw):
        return SimpleNamespace(id=repo_id, private=self._call(api, "repo_info", repo_id, "see")[1]["private"])

    def create_repo(self, api, repo_id, *, private=None, exist_ok=False, **kw):
        self._call(api, "create_repo", repo_id, "create")
        if repo_id in self.repos and not exist_ok:
            raise http_error(409, "You already created this model repo")
        self.repos.setdefault(repo_id, {"private": bool(private), "branches": {"main": {}}})

    def create_branch(self, api, repo_id, *, branch, exist_ok=False, **kw):
        repo = self._call(api, "create_branch", repo_id, "write")[1]
        repo["branches"].setdefault(branch, dict(repo["branches"]["main"]))

    def get_paths_info(self, api, repo_id, paths, *, revision=None, **kw):
        files = self._call(api, "get_paths_info", repo_id, "see")[1]["branches"][revision or "main"]
        out = []
        for p, data in ((p, files[p]) for p in paths if p in files):
            lfs = SimpleNamespace(sha256=hashlib.sha256(data).hexdigest()) if p.endswith(".safetensors") else None
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            out.append(SimpleNamespace(path=p, size=len(data), blob_id=blob, lfs=lfs))
        return out

    def create_commit(self, api, repo_id, operations, *, commit_message, revision=None, **kw):
        repo = self._call(api, "create_commit", repo_id, "write")[1]
        added = {}
        for op in operations:
            src = op.path_or_fileobj
            added[op.path_in_repo] = src if isinstance(src, bytes) else Path(src).read_bytes()
        if self.reject_card and "README.md" in added:  # as the client reports the Hub's validate-yaml answer
            raise ValueError(f"Invalid metadata in README.md.\n- {self.reject_card}")
        if self.fail_commit:
            raise http_error(*self.fail_commit)
        repo["branches"][revision or "main"].update(added)
        self.commits.append(Commit(repo_id, revision or "main", commit_message, added))
        oid = f"{len(self.commits):040x}"
        return SimpleNamespace(commit_url=f"{api.endpoint}/{repo_id}/commit/{oid}", oid=oid)


def _isolate(monkeypatch, tmp_path: Path) -> None:
    """huggingface_hub with no token anywhere, online, at ENDPOINT, reading nothing from the user's home."""
    import huggingface_hub.constants as hf

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)  # conftest sets HF_HUB_OFFLINE=1 for the rest of the suite
    monkeypatch.setattr(hf, "ENDPOINT", ENDPOINT)
    monkeypatch.setattr(hf, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))


@pytest.fixture
def hub(monkeypatch, tmp_path):
    from huggingface_hub import HfApi

    fake = FakeHub({TOKEN: User("alice", {"acme": "write", "readers": "read"}), READ_TOKEN: User("alice", role="read")})
    for name in ("whoami", "repo_info", "create_repo", "create_branch", "get_paths_info", "create_commit"):
        monkeypatch.setattr(HfApi, name, lambda api, *a, _m=getattr(fake, name), **kw: _m(api, *a, **kw))
    _isolate(monkeypatch, tmp_path)
    return fake


# ----------------------------------------------------------------------------------------------- folders


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny llama with a valid edit record and card: in one file, and sharded with an index."""
    root = tmp_path_factory.mktemp("models")
    model = build("llama")
    record = EditRecord(mode="ablate", base_model="org/base", direction_sha256="ab" * 32, name="tiny-abliterated")
    save(model, root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    shutil.copytree(
        root / "single", root / "sharded", dirs_exist_ok=True, ignore=lambda d, n: [x for x in n if "model" in x]
    )
    for name in ("single", "sharded"):
        save_record(record, root / name)  # the record and its card
    return {"single": root / "single", "sharded": root / "sharded"}


@pytest.fixture
def folder(models, tmp_path) -> Path:
    return Path(shutil.copytree(models["single"], tmp_path / "tiny-abliterated"))


@pytest.fixture
def sharded(models, tmp_path) -> Path:
    return Path(shutil.copytree(models["sharded"], tmp_path / "tiny-sharded"))


def snapshot(root: Path) -> dict[str, tuple]:
    """Everything observable about a folder: names, sizes, mtimes, bytes (and directory mtimes)."""
    state: dict[str, tuple] = {".": ("dir", root.stat().st_mtime_ns)}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        small = p.is_file() and not p.is_symlink() and st.st_size < 1 << 26  # big (sparse) files: size and mtime
        data = hashlib.sha256(p.read_bytes()).hexdigest() if small else None
        state[p.relative_to(root).as_posix()] = (st.st_mode, st.st_size, st.st_mtime_ns, data)
    return state


def model_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def flat(text: str) -> str:
    return " ".join(text.split())


def front_matter(card: bytes) -> dict:
    return yaml.safe_load(card.decode().split("---")[1])


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
    (folder / "pytorch_model.bin").write_bytes(b"unedited weights")


def add_hostile(folder: Path) -> list[str]:
    """Links out of the folder and pickles under every disguise; returns their names."""
    (folder / "passwd").symlink_to("/etc/passwd")
    (folder / "shadow.txt").symlink_to("/etc/shadow")
    (folder / "etc").symlink_to("/etc", target_is_directory=True)
    (folder / "config-link.json").symlink_to(folder / "config.json")  # even a link inside the folder
    (folder / "state.pkl").write_bytes(pickle.dumps({"a": 1}))
    torch.save({"w": torch.zeros(2)}, folder / "optimizer.pth.tar")  # a zip holding data.pkl
    (folder / "weights.bin.bak").write_bytes(pickle.dumps([1, 2], protocol=2))
    (folder / "notes").write_bytes(pickle.dumps({"x": 1}, protocol=0))
    (folder / "data.json").write_bytes(pickle.dumps({"x": 1}, protocol=5))
    (folder / "tables.npy.gz").write_bytes(gzip.compress(pickle.dumps([1], protocol=4)))
    (folder / "cache.joblib").write_bytes(zlib.compress(pickle.dumps({"k": 2})))
    np.save(folder / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(folder / "bundle.zip", "w") as zf:
        zf.writestr("inner/blob", pickle.dumps(1, protocol=3))
    links = ["passwd", "shadow.txt", "etc/", "config-link.json"]
    pickles = ["state.pkl", "optimizer.pth.tar", "weights.bin.bak", "notes", "data.json", "tables.npy.gz"]
    return links + pickles + ["cache.joblib", "objects.npy", "bundle.zip"]


# ----------------------------------------------------------------------------------------------- uploads


def test_push_uploads_exactly_the_model_files_privately(folder, hub, cli, monkeypatch):
    expected = model_files(folder)
    (folder / "extra").mkdir()
    (folder / "extra" / "notes.txt").write_text("user content in a subfolder: not a model file\n")
    add_strays(folder)
    before = snapshot(folder)
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    result = cli("push", folder, "--repo", "alice/tiny-abliterated")

    assert result.code == 0, result.text
    (commit,) = hub.commits
    assert (commit.repo_id, commit.revision) == ("alice/tiny-abliterated", "main")
    assert commit.files == expected  # no temp dir, cache, lock, partial, hidden or foreign weights file
    assert hub.names() == ["whoami", "repo_info", "create_repo", "create_commit"]
    assert hub.repos["alice/tiny-abliterated"]["private"]
    assert all(token == TOKEN and endpoint == ENDPOINT for _, token, endpoint in hub.calls)
    assert TOKEN not in result.text
    meta = front_matter(commit.files["README.md"])
    assert meta["base_model"] == "org/base" and {"refusal-edit", "abliterated"} <= set(meta["tags"])
    text = flat(result.text)
    assert "skipped pytorch_model.bin" in text and "private, new repo" in text
    assert "skipped extra/notes.txt: not a model file (publish it on purpose with --include PATTERN)" in text
    size = sum(len(b) for b in expected.values())
    assert f"uploading {len(expected)} files ({size / 1e3:.2f} KB;" in text  # said before the upload
    assert snapshot(folder) == before


def test_hostile_files_are_never_listed(folder, hub, cli):
    hostile = add_hostile(folder)
    (folder / "ok.zip").write_bytes(b"")
    with zipfile.ZipFile(folder / "ok.zip", "w") as zf:
        zf.writestr("readme.txt", "plain text")
    before = snapshot(folder)
    plan = check_folder(folder, include=("*",))  # even asked for by name, none goes up
    skipped = dict(plan.skipped)
    assert set(hostile) <= set(skipped), set(hostile) - set(skipped)
    assert not set(hostile) & set(plan.names())
    assert "ok.zip" in plan.names() and "config.json" in plan.names()
    assert "symbolic link" in skipped["passwd"] and "pickled data" in skipped["weights.bin.bak"]
    assert "zip archive holding pickled data" in skipped["optimizer.pth.tar"]

    result = cli("push", folder, "--repo", "alice/tiny", "--token", TOKEN, "--include", "*")
    assert result.code == 0, result.text
    assert not set(hostile) & set(hub.commits[0].files) and "ok.zip" in hub.commits[0].files
    assert snapshot(folder) == before


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"# Title\n\nla la land.\n",
        b'{"a": [1, 2]}',
        b"N",
        b"\x80\x02\x00\x00\x00\x00\x00\x00{}",
        bytes(range(256)),
    ],
)
def test_ordinary_content_is_not_taken_for_a_pickle(tmp_path, data):
    (tmp_path / "f").write_bytes(data)
    assert pickle_reason(tmp_path / "f") is None


def test_required_file_that_is_a_link_is_an_error(folder, hub, cli):
    (folder / "tokenizer.json").rename(folder.parent / "tokenizer.json")
    (folder / "tokenizer.json").symlink_to(folder.parent / "tokenizer.json")
    result = cli("push", folder, "--repo", "alice/tiny", "--dry-run")
    assert result.code == 1
    assert "tokenizer.json in" in flat(result.text) and "cannot be published: symbolic link" in flat(result.text)


def test_public_revision_and_commit_message(folder, hub, cli):
    result = cli(
        "push", folder, "--repo", "acme/tiny", "--public", "--revision", "dev",
        "--commit-message", "first edit", "--token", TOKEN,
    )  # fmt: skip

    assert result.code == 0, result.text
    assert hub.names() == ["whoami", "repo_info", "create_repo", "create_branch", "create_commit"]
    (commit,) = hub.commits
    assert (commit.repo_id, commit.revision, commit.summary) == ("acme/tiny", "dev", "first edit")
    repo = hub.repos["acme/tiny"]
    assert not repo["private"]
    assert "model.safetensors" in repo["branches"]["dev"] and "model.safetensors" not in repo["branches"]["main"]
    assert TOKEN not in result.text


def test_sharded_checkpoint_with_generated_card(sharded, hub, cli, monkeypatch):
    (sharded / "README.md").unlink()
    expected = model_files(sharded)
    record = EditRecord.load(sharded)
    before = snapshot(sharded)
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    result = cli("push", sharded, "--repo", "tiny-sharded")  # bare name: the token owner's namespace

    assert result.code == 0, result.text
    (commit,) = hub.commits
    assert commit.repo_id == "alice/tiny-sharded"
    shards = set(json.loads(expected["model.safetensors.index.json"])["weight_map"].values())
    assert len(shards) > 1 and shards <= set(commit.files)
    assert commit.files == expected | {"README.md": render_card(record).encode()}
    assert not (sharded / "README.md").exists()  # generated in memory only
    assert snapshot(sharded) == before


def test_token_from_login_cache(folder, hub, cli, tmp_path):
    (tmp_path / "hf-home").mkdir()
    (tmp_path / "hf-home" / "token").write_text(TOKEN + "\n")
    result = cli("push", folder, "--repo", "alice/cached")
    assert result.code == 0, result.text
    assert hub.calls and all(token == TOKEN for _, token, _ in hub.calls)
    assert TOKEN not in result.text


def test_existing_repo_only_changed_files_are_sent(folder, hub, cli):
    hub.add_repo("alice/existing", private=True)
    first = cli("push", folder, "--repo", "alice/existing", "--token", TOKEN)
    assert first.code == 0, first.text
    assert "create_repo" not in hub.names() and "existing repo" in flat(first.text)

    again = cli("push", folder, "--repo", "alice/existing", "--token", TOKEN)
    assert again.code == 0, again.text
    assert "nothing to commit" in flat(again.text) and len(hub.commits) == 1

    (folder / "README.md").write_text((folder / "README.md").read_text() + "\nMore words.\n")
    third = cli("push", folder, "--repo", "alice/existing", "--token", TOKEN)
    assert third.code == 0, third.text
    assert list(hub.commits[-1].files) == ["README.md"] and "pushed 1 files" in flat(third.text)


def test_existing_public_repo_needs_public(folder, hub, cli):
    hub.add_repo("alice/open", private=False)
    refused = cli("push", folder, "--repo", "alice/open", "--token", TOKEN)
    assert refused.code == 1
    assert "alice/open already exists and is public: pushes are private unless public is set" in flat(refused.text)
    assert hub.commits == []

    allowed = cli("push", folder, "--repo", "alice/open", "--public", "--token", TOKEN)
    assert allowed.code == 0, allowed.text
    assert len(hub.commits) == 1


def test_dry_run_contacts_nothing(folder, hub, cli):
    (folder / "README.md").unlink()
    add_strays(folder)
    before = snapshot(folder)

    result = cli("push", folder, "--repo", "alice/tiny", "--dry-run")  # no token anywhere: not needed

    assert result.code == 0, result.text
    assert hub.calls == []
    text = flat(result.text)
    for name in ("config.json", "model.safetensors", "tokenizer.json", RECORD, "README.md"):
        assert name in text
    assert "README.md (generated from refusal_edit.json)" in text
    assert "base_model: org/base" in result.text and "- abliterated" in result.text
    assert "skipped pytorch_model.bin" in text and TMP_MARK in text
    assert f"to {ENDPOINT}/alice/tiny" in text and "nothing was contacted" in text
    assert snapshot(folder) == before


# ----------------------------------------------------------------------------------------------- refusals


def test_no_token(folder, hub, cli):
    result = cli("push", folder, "--repo", "alice/tiny")
    assert result.code == 1 and NO_TOKEN in flat(result.text) and "Traceback" not in result.text
    assert hub.calls == []


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (WRONG_TOKEN, f"the Hub at {ENDPOINT} rejected the token (401 Unauthorized)"),
        (READ_TOKEN, "you cannot write to alice/tiny: the token is read-only"),
    ],
)
def test_bad_tokens(folder, hub, cli, token, message):
    result = cli("push", folder, "--repo", "alice/tiny", "--token", token)
    assert result.code == 1 and message in flat(result.text)
    assert hub.names() == ["whoami"] and hub.calls[0][1] == token
    assert token not in result.text and TOKEN not in result.text


def test_unreachable_hub_and_offline_mode(folder, hub, cli, monkeypatch):
    hub.down = True
    result = cli("push", folder, "--repo", "alice/tiny", "--token", TOKEN)
    assert result.code == 1 and f"cannot reach the Hub at {ENDPOINT} ([Errno 111] Connection refused)" in flat(
        result.text
    )
    assert "Traceback" not in result.text and TOKEN not in result.text

    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    hub.calls.clear()
    result = cli("push", folder, "--repo", "alice/tiny", "--token", TOKEN)
    assert result.code == 1 and "offline mode is on (HF_HUB_OFFLINE)" in flat(result.text)
    assert hub.calls == []


@pytest.mark.parametrize(
    ("repo", "why"),
    [
        ("bob/model", "the token belongs to alice, who is not a member of bob"),  # whoami says so: no request
        ("readers/new-model", "create repo: 403 Forbidden"),  # org where alice only reads: create refused
        ("readers/shared", "commit: 403 Forbidden"),  # visible existing repo: the commit is refused
    ],
)
def test_repo_owned_by_someone_else(folder, hub, cli, repo, why):
    hub.add_repo("readers/shared", private=True)
    before = snapshot(folder)
    result = cli("push", folder, "--repo", repo, "--token", TOKEN)
    assert result.code == 1
    text = flat(result.text)
    assert f"you cannot write to {repo}" in text and why in text
    assert hub.commits == [] and "Traceback" not in result.text and TOKEN not in result.text
    assert snapshot(folder) == before


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("config.json", "no config.json"),
        ("model.safetensors", "no safetensors weights"),
        ("tokenizer.json", "missing tokenizer (tokenizer.json or tokenizer.model)"),
        ("tokenizer_config.json", "missing tokenizer_config.json"),
        (RECORD, f"missing {RECORD}"),
    ],
)
def test_incomplete_folder(folder, hub, cli, remove, message):
    (folder / remove).unlink()
    result = cli("push", folder, "--repo", "alice/tiny", "--token", TOKEN)
    assert result.code == 1 and message in flat(result.text)
    assert hub.calls == []  # checked before anything is contacted


def test_incomplete_sharded_or_truncated_weights(sharded, folder, hub, cli):
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    result = cli("push", sharded, "--repo", "alice/tiny", "--token", TOKEN)
    assert result.code == 1 and f"missing shard {shard.name}" in flat(result.text)

    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    result = cli("push", folder, "--repo", "alice/tiny", "--token", TOKEN)
    assert result.code == 1 and "truncated safetensors file model.safetensors" in flat(result.text)
    assert hub.calls == []


def test_unindexed_weights(sharded, folder, hub, cli):
    shutil.copy(folder / "model.safetensors", sharded / "model.safetensors")
    result = cli("push", sharded, "--repo", "alice/tiny", "--token", TOKEN)
    assert result.code == 1 and "model.safetensors in" in flat(result.text) and "does not list it" in flat(result.text)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({}, f"{RECORD} is not an edit record: it lacks tool, tool_version, mode, base_model"),
        ("not json", f"{RECORD} is not valid JSON"),
        ("folder-name", "base_model must be a Hub model id ORG/NAME or null"),
        (None, f"{RECORD} does not name the base model"),
    ],
)
def test_invalid_record_never_becomes_a_card(folder, hub, cli, record, message):
    (folder / "README.md").unlink()
    if isinstance(record, str) and record != "not json":
        data = json.loads((folder / RECORD).read_text()) | {"base_model": record}
    elif record is None:
        data = json.loads((folder / RECORD).read_text()) | {"base_model": None}
    else:
        data = record
    (folder / RECORD).write_text(data if isinstance(data, str) else json.dumps(data))
    result = cli("push", folder, "--repo", "alice/tiny", "--dry-run")
    assert result.code == 1 and message in flat(result.text)
    assert "refusal-amplified" not in result.text and "Traceback" not in result.text


def test_unknown_base_model_with_a_card_that_names_it(folder, hub, cli):
    record = EditRecord.load(folder)
    record.base_model = None
    record.save(folder)
    result = cli("push", folder, "--repo", "alice/tiny", "--dry-run")  # README.md (kept) says org/base
    assert result.code == 0, result.text


@pytest.mark.parametrize(
    ("card", "message"),
    [
        ("# A model\n\nNo metadata here.\n", "README.md has no YAML metadata block"),
        ("---\nlibrary_name: transformers\n---\n# x\n", "README.md metadata lacks base_model"),
        ("---\ntags: [refusal-edit\n---\n# x\n", "README.md metadata is not valid YAML"),
        ("---\n- a\n- b\n---\n# x\n", "README.md metadata is not a YAML mapping"),
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
    assert result.code == 1 and message in flat(result.text)
    assert hub.calls == []


def test_hub_rejects_card_metadata(folder, hub, cli):
    hub.reject_card = '"base_model" must be the id of an existing model'
    result = cli("push", folder, "--repo", "alice/tiny", "--token", TOKEN)
    assert result.code == 1
    assert 'the Hub rejected the model card metadata: "base_model" must be the id' in flat(result.text)
    assert hub.commits == []


def test_failed_upload_leaves_folder_untouched(folder, hub, cli):
    (folder / "README.md").unlink()  # the generated card must not be written either
    add_strays(folder)
    before = snapshot(folder)
    hub.fail_commit = (500, "storage backend unavailable")
    result = cli("push", folder, "--repo", "alice/tiny", "--token", TOKEN)
    assert result.code == 1 and "commit for alice/tiny failed" in flat(result.text)
    assert "HTTP 500: storage backend unavailable" in flat(result.text)
    assert hub.commits == [] and TOKEN not in result.text
    assert snapshot(folder) == before


@pytest.mark.parametrize(
    ("revision", "why"),
    [
        ("../../main", "'..'"),
        ("a b", "spaces or control characters"),
        ("a..b", "'..'"),
        ("x@{1}", "'@{'"),
        ("dev.lock", "'.lock'"),
        ("feat/.hidden", "starts with '.'"),
        ("tab\there", "control characters"),
        ("esc\x1bape", "control characters"),
        ("what?", "any of ~ ^ : ? * [ \\"),
        ("/main", "an empty part"),
        ("a//b", "an empty part"),
        ("main.", "ends with '.'"),
        ("@", "is '@'"),
        ("0" * 40, "a commit id"),
    ],
)
def test_revision_follows_git_ref_rules_even_in_a_dry_run(folder, hub, cli, revision, why):
    result = cli("push", folder, "--repo", "alice/x", "--revision", revision, "--dry-run")
    assert result.code == 1
    assert f"revision {revision!r} is not a valid branch name: it contains" in result.text.replace("\n", "")
    assert why in flat(result.text) and "Traceback" not in result.text
    assert hub.calls == []


def test_invalid_repo_id(folder, hub, cli):
    for repo in ("a/b/c", "a b", "../x"):
        result = cli("push", folder, "--repo", repo, "--dry-run")
        assert result.code == 1 and f"invalid repo id {repo!r}" in flat(result.text)
    assert hub.calls == []


# ----------------------------------------------------------------------------------------------- library + script


def test_library_api(folder, hub, monkeypatch, tmp_path):
    add_strays(folder)
    plan = check_folder(folder)
    assert "README.md" in plan.names() and not plan.card_generated
    assert "pytorch_model.bin" not in plan.names()
    skipped = dict(plan.skipped)
    assert f"tiny-abliterated{TMP_MARK}3f2a9c1d/" in skipped and ".cache/" in skipped and "__pycache__/" in skipped
    assert plan.total_bytes == sum((folder / n).stat().st_size for n in plan.names())
    assert plan.record.base_model == "org/base"

    dry = push_folder(folder, "alice/lib", dry_run=True, plan=plan)
    assert dry.dry_run and dry.private and dry.commit_url is None and hub.calls == []

    result = push_folder(folder, "alice/lib", token=TOKEN, endpoint="https://other.test/")  # explicit endpoint wins
    assert result.created and result.private and result.commit_oid == f"{1:040x}"
    assert result.url == "https://other.test/alice/lib" and hub.calls[0][2] == "https://other.test"
    assert TOKEN not in repr(result)

    with pytest.raises(RefusalEditError, match="no Hugging Face token"):
        resolve_token(None)
    (tmp_path / "hf-home").mkdir()
    (tmp_path / "hf-home" / "token").write_text("from-file\n")
    assert resolve_token(None) == "from-file"
    monkeypatch.setenv("HF_TOKEN", "from-env")
    assert resolve_token(None) == "from-env"
    assert resolve_token(" explicit ") == "explicit"
    assert resolve_endpoint("https://hub.example.com/") == "https://hub.example.com"
    assert resolve_endpoint() == ENDPOINT
    with pytest.raises(RefusalEditError, match="must be an http"):
        resolve_endpoint("hub.example.com")


def test_console_script(folder, tmp_path):
    """The installed `refusal-edit` takes the endpoint from HF_ENDPOINT like any huggingface_hub program."""
    script = Path(sys.executable).with_name("refusal-edit")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE", "TRANSFORMERS_OFFLINE"))}
    env.update(HF_ENDPOINT="https://mirror.test", HF_HOME=str(tmp_path / "home"), HF_TOKEN=TOKEN)

    ok = subprocess.run(
        [script, "push", folder, "--repo", "alice/s", "--dry-run"], env=env, capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert "https://mirror.test/alice/s" in flat(ok.stdout + ok.stderr) and TOKEN not in ok.stdout + ok.stderr


def test_push_uses_only_the_public_client():
    """Push, card and record talk to huggingface_hub through its public names only: no private module or
    attribute, no HTTP stack of its own, so a client upgrade cannot break them silently."""
    import ast

    import refusal_edit

    package = Path(refusal_edit.__file__).parent
    files = [
        *sorted((package / "hub").glob("*.py")),
        package / "checkpoint" / "card.py",
        package / "checkpoint" / "record.py",
    ]
    imported = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported |= {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                assert isinstance(node.value, ast.Name) and node.value.id == "self", (path.name, node.attr)
    hub_names = {n for n in imported if n.startswith("huggingface_hub")}
    assert hub_names and not [n for n in hub_names if any(p.startswith("_") for p in n.split("."))]
    assert not {n.split(".")[0] for n in imported} & {"requests", "httpx", "urllib3", "urllib", "http", "aiohttp"}


# ----------------------------------------------------------------------------------------------- allow list + secrets

# Secret-shaped values, assembled at run time so that no scanner takes this file for a leak.
HF_SECRET = "hf_" + "Qx7Lm2Pw" * 4 + "Zk"
SECRETS = {
    "hf": (f"HF_TOKEN={HF_SECRET}\n", "a Hugging Face token"),
    "ssh": ("-----BEGIN OPENSSH " + "PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n", "a private key"),
    "rsa": ("-----BEGIN RSA " + "PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\n", "a private key"),
    "aws": ("[default]\naws_access_key_id = " + "AKIA" + "IOSFODNN7EXAMPLE\n", "an AWS access key id"),
    "aws-secret": ("aws_secret_access_key=" + "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + "EXAMPLEKEY\n", "an AWS secret"),
    "gcp": ('{"type": "service_account", "project_id": "p"}', "a Google Cloud service-account key"),
    "github": ("token: " + "ghp_" + "a1B2c3D4e5" * 3 + "F6g7H8\n", "a GitHub token"),
    "openai": ("key = 'sk-" + "proj-" + "Ab1Cd2Ef3Gh4" * 4 + "'\n", "an OpenAI or Anthropic API key"),
}


def test_only_what_a_model_repository_holds_goes_up(folder, hub, cli, monkeypatch):
    """The issue's folder: a private key, a token file, cloud credentials and a 6.4 GB data file beside the
    model. None goes up, each is listed with its reason, and no skipped file is even opened."""
    from refusal_edit.hub import plan as plan_module
    from refusal_edit.hub import secrets

    opened = []

    def watched(path, *args, **kwargs):
        opened.append(Path(path).name)
        return open(path, *args, **kwargs)

    for module in (plan_module, secrets):
        monkeypatch.setattr(module, "open", watched, raising=False)
    (folder / "id_ed25519").write_text(SECRETS["ssh"][0])
    (folder / "token.txt").write_text(SECRETS["hf"][0])
    (folder / "credentials").write_text(SECRETS["aws"][0])
    with open(folder / "activations.jsonl", "wb") as fh:
        fh.truncate(6_400_000_000)
    (folder / "model.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))  # not this checkpoint's weights
    (folder / "runs").mkdir()
    (folder / "runs" / "extract.log").write_text("log\n")
    for name, text in (
        ("generation_config.json", '{"max_new_tokens": 8}'),
        ("chat_template.jinja", "{{ messages }}"),
        ("LICENSE", "Apache-2.0\n"),
        ("special_tokens_map.json", "{}"),
    ):
        (folder / name).write_text(text)
    (folder / "assets").mkdir()
    (folder / "assets" / "plot.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(32))
    (folder / "assets" / "other.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(32))
    card = (folder / "README.md").read_text()
    (folder / "README.md").write_text(card + "\n![the sweep](./assets/plot.png)\n![remote](https://x.test/a.png)\n")
    before = snapshot(folder)

    result = cli("push", folder, "--repo", "alice/tiny", "--dry-run")

    assert result.code == 0, result.text
    plan = check_folder(folder)
    assert set(plan.names()) == {
        "README.md", "config.json", "model.safetensors", RECORD, "tokenizer.json", "tokenizer_config.json",
        "generation_config.json", "chat_template.jinja", "LICENSE", "special_tokens_map.json", "assets/plot.png",
    }  # fmt: skip
    skipped = dict(plan.skipped)
    for name in ("id_ed25519", "token.txt", "credentials", "activations.jsonl", "model.gguf", "runs/extract.log"):
        assert skipped[name] == "not a model file (publish it on purpose with `include` PATTERN)", name
    assert "assets/other.png" in skipped  # an image the card does not show
    assert {"token.txt", "id_ed25519", "credentials", "activations.jsonl", "other.png"}.isdisjoint(opened)
    assert {"tokenizer.json", "plot.png"} <= set(opened)  # what goes up is scanned
    text = flat(result.text)
    assert f"would push 11 files ({plan.total_bytes / 1e3:.2f} KB)" in text and "GB" not in text
    assert "skipped token.txt: not a model file (publish it on purpose with --include PATTERN)" in text
    assert HF_SECRET not in result.text and snapshot(folder) == before


def test_include_adds_files_on_purpose_but_never_a_secret(folder, hub, cli):
    (folder / "eval").mkdir()
    (folder / "eval" / "report.json").write_text('{"refusal_rate": 0.1}')
    (folder / "notes.txt").write_text("how it was made\n")
    (folder / "token.txt").write_text("line one\n" + SECRETS["hf"][0])
    before = snapshot(folder)

    ok = cli("push", folder, "--repo", "alice/tiny", "--token", TOKEN, "--include", "eval", "--include", "*.txt")
    assert ok.code == 1 and hub.calls == []  # *.txt names token.txt too: refused, nothing contacted
    assert "token.txt holds what looks like a Hugging Face token (line 2): nothing was pushed" in flat(ok.text)
    assert HF_SECRET not in ok.text

    (folder / "token.txt").unlink()
    ok = cli("push", folder, "--repo", "alice/tiny", "--token", TOKEN, "--include", "eval", "--include", "*.txt")
    assert ok.code == 0, ok.text
    assert {"eval/report.json", "notes.txt"} <= set(hub.commits[0].files)
    before.pop("token.txt")
    assert snapshot(folder) == before | {".": snapshot(folder)["."]}


WHERE = ["README.md", "config.json", "chat_template.jinja", "LICENSE.txt", "assets/a.png"]


@pytest.mark.parametrize(("secret", "where"), [(s, WHERE[i % len(WHERE)]) for i, s in enumerate(sorted(SECRETS))])
def test_a_secret_in_any_file_that_would_go_up_refuses_the_push(folder, hub, cli, secret, where):
    content, what = SECRETS[secret]
    path = folder / where
    path.parent.mkdir(exist_ok=True)
    if where == "README.md":
        path.write_text(path.read_text() + "\n![plot](assets/a.png)\n\nSetup:\n\n    " + content)
    elif where == "config.json":
        config = json.loads(path.read_text()) | {"_comment": content}
        path.write_text(json.dumps(config, indent=2))
    elif where == "assets/a.png":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40) + b"tEXtComment\0" + content.encode() + bytes(8))
        (folder / "README.md").write_text((folder / "README.md").read_text() + "\n<img src='assets/a.png'>\n")
    else:
        path.write_text("text\n" + content)
    before = snapshot(folder)

    result = cli("push", folder, "--repo", "alice/tiny", "--token", TOKEN)

    assert result.code == 1 and hub.calls == []
    assert f"{where} holds what looks like {what}" in flat(result.text) and "Traceback" not in result.text
    assert content.strip().splitlines()[-1] not in result.text  # the secret itself is never printed
    assert snapshot(folder) == before


def test_a_secret_in_the_weights_metadata_refuses_the_push(folder, hub, cli):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt", "pushed_with": HF_SECRET})
    result = cli("push", folder, "--repo", "alice/tiny", "--dry-run")
    assert result.code == 1 and "model.safetensors holds what looks like a Hugging Face token" in flat(result.text)
    assert HF_SECRET not in result.text


def test_secret_scan_streams_and_finds_a_secret_across_blocks(tmp_path):
    from refusal_edit.hub import secrets

    big = tmp_path / "data.txt"
    lines = b"x" * 99 + b"\n"
    block_lines = secrets.BLOCK // len(lines)
    head = lines * block_lines + b" " * (secrets.BLOCK % len(lines) - 10)  # the token starts 10 bytes before
    big.write_bytes(head + HF_SECRET.encode() + b"\n" + lines * 10)
    assert secrets.scan_file(big) == ("a Hugging Face token", block_lines + 1)
    clean = tmp_path / "clean.txt"
    clean.write_bytes(lines * (3 * block_lines))
    assert secrets.scan_file(clean) is None
    # look-alikes that are not secrets: too short, part of a longer word, a placeholder
    for text in ("hf_short", "xhf_" + "a" * 34, "AKIA-EXAMPLE", "sk-your-key-here", "BEGIN PUBLIC KEY"):
        assert secrets.find_secret(text.encode()) is None, text


def test_tokenizers_and_configs_do_not_look_like_secrets(folder):
    """What every model folder holds scans clean: a real vocabulary's tokens are not token-shaped."""
    from refusal_edit.hub.secrets import scan_file

    for p in sorted(folder.iterdir()):
        assert scan_file(p) is None, p.name


def test_base_model_at_push_time(folder, hub, cli):
    record = EditRecord.load(folder)
    record.base_model = None
    record.save(folder)
    (folder / "README.md").unlink()
    before = snapshot(folder)

    refused = cli("push", folder, "--repo", "alice/tiny", "--dry-run")
    assert refused.code == 1
    assert "pass --base-model ORG/NAME (the Hub id the edit descends from)" in flat(refused.text)

    bad = cli("push", folder, "--repo", "alice/tiny", "--dry-run", "--base-model", "/home/me/base")
    assert bad.code == 1 and "--base-model '/home/me/base' is not a Hub model id" in flat(bad.text)

    ok = cli("push", folder, "--repo", "alice/tiny", "--token", TOKEN, "--base-model", "org/base")
    assert ok.code == 0, ok.text
    files = hub.commits[0].files
    assert front_matter(files["README.md"])["base_model"] == "org/base"
    assert json.loads(files[RECORD])["base_model"] == "org/base"  # record and card agree, made in memory
    assert snapshot(folder) == before


def test_gguf_metadata_is_scanned_and_its_tensor_data_is_not(tmp_path):
    from gguf import GGUFWriter

    from refusal_edit.hub.secrets import scan_file

    def write(path: Path, comment: str, data: bytes) -> Path:
        w = GGUFWriter(str(path), "llama")
        w.add_string("general.comment", comment)
        w.add_array("tokenizer.ggml.tokens", ["a", "b", "hf_short"])
        w.add_tensor("t", np.frombuffer(data.ljust(64, b" "), dtype=np.int8).copy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    assert scan_file(write(tmp_path / "a.gguf", f"token {HF_SECRET}", b"")) == ("a Hugging Face token", 1)
    assert scan_file(write(tmp_path / "b.gguf", "clean", f" {HF_SECRET} ".encode())) is None  # weights' bytes
