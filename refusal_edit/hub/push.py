"""Push an edited checkpoint folder to the Hugging Face Hub.

Everything that can be checked locally is checked before the first request: the folder must be a
complete model (config, weights with their index, tokenizer, `refusal_edit.json`), its card must carry
the metadata the Hub indexes, and only the model's own files go up (no temp dirs, caches, locks or
unedited pickle weights). The user's folder is never written to: a card that has to be generated is
uploaded from memory. The upload itself is one `create_commit` with an explicit file list, so what the
dry run shows is exactly what is committed.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from refusal_edit import __version__
from refusal_edit.checkpoint.atomic import TMP_MARK
from refusal_edit.checkpoint.card import RECORD, card_metadata, read_record, render_card
from refusal_edit.checkpoint.layout import FOREIGN_WEIGHTS, INDEX, open_checkpoint
from refusal_edit.errors import RefusalEditError

DEFAULT_ENDPOINT = "https://huggingface.co"
CARD = "README.md"
NO_TOKEN = "no Hugging Face token: pass --token, set HF_TOKEN or run `hf auth login`"

# Any one of these is a usable tokenizer next to tokenizer_config.json (fast, sentencepiece, BPE, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "tiktoken.model")
CACHE_DIRS = frozenset({"__pycache__", ".cache", ".ipynb_checkpoints", ".huggingface", ".git"})
OS_JUNK = frozenset({".DS_Store", "Thumbs.db", "desktop.ini", "__MACOSX", ".Spotlight-V100", ".Trashes"})
PARTIAL_SUFFIXES = (".lock", ".tmp", ".part", ".partial", ".incomplete", ".swp", ".pyc", "~")
SHA_RE = re.compile(r"[0-9a-f]{40}")


@dataclass
class UploadFile:
    """One file of the commit: read from `source`, or `content` generated in memory (never written locally)."""

    path_in_repo: str
    size: int
    source: Path | None = None
    content: bytes | None = None

    @property
    def generated(self) -> bool:
        return self.source is None

    def operation(self) -> Any:
        from huggingface_hub import CommitOperationAdd

        data = self.content if self.source is None else str(self.source)
        return CommitOperationAdd(path_in_repo=self.path_in_repo, path_or_fileobj=data)  # type: ignore[arg-type]


@dataclass
class UploadPlan:
    """What a push of `root` would send, decided entirely offline."""

    root: Path
    files: list[UploadFile]
    skipped: list[tuple[str, str]]  # (path relative to root, why it stays local)
    record: dict[str, Any]
    card: str
    card_generated: bool
    metadata: dict[str, Any]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def names(self) -> list[str]:
        return [f.path_in_repo for f in self.files]


@dataclass
class PushResult:
    repo_id: str
    revision: str
    endpoint: str
    url: str
    private: bool | None  # visibility of the target repo (for a dry run: what a new repo would get)
    created: bool  # the repo did not exist before this push
    dry_run: bool
    plan: UploadPlan
    commit_url: str | None = None
    commit_oid: str | None = None
    unchanged: list[str] = field(default_factory=list)  # files the repo already had byte for byte (not re-sent)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- local checks


def _stray_reason(name: str, is_dir: bool) -> str | None:
    """Why a file or directory must not be published, or None if it belongs to the model."""
    if TMP_MARK in name:
        return "temporary output of an unfinished write"
    if name in CACHE_DIRS:
        return "cache or version-control directory"
    if name in OS_JUNK or name.startswith("._"):
        return "OS metadata"
    if name.startswith("."):
        return "hidden"
    if not is_dir and name.endswith(PARTIAL_SUFFIXES):
        return "lock, temporary or partial file"
    if not is_dir and name.lower().endswith(FOREIGN_WEIGHTS):
        return "non-safetensors weights (unedited or pickled): never published"
    return None


def _walk(root: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files to publish and skipped entries, in a stable order; stray directories are pruned whole."""
    keep: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        rel_dir = here.relative_to(root)
        for d in sorted(dirnames):
            why = _stray_reason(d, is_dir=True)
            if why is None and (here / d).is_symlink():
                why = "symlinked directory"
            if why is not None:
                skipped.append(((rel_dir / d).as_posix() + "/", why))
        dirnames[:] = sorted(d for d in dirnames if _stray_reason(d, True) is None and not (here / d).is_symlink())
        for f in sorted(filenames):
            rel = (rel_dir / f).as_posix()
            why = _stray_reason(f, is_dir=False)
            if why is None and not (here / f).is_file():
                why = "broken link or not a regular file"
            if why is not None:
                skipped.append((rel, why))
            else:
                keep.append(here / f)
    keep.sort(key=lambda p: p.relative_to(root).as_posix())
    skipped.sort()
    return keep, skipped


def _front_matter(text: str) -> str | None:
    m = re.match(r"\A\ufeff?---[ \t]*\r?\n(.*?)(?:\r?\n)?^---[ \t]*$", text, flags=re.DOTALL | re.MULTILINE)
    return None if m is None else m.group(1)


def validate_card(text: str, record: dict[str, Any]) -> dict[str, Any]:
    """Parse a card's YAML metadata and require what the Hub indexes for an edited model.

    `base_model` links the edit to its parent, and the edit's tag (`abliterated` / `refusal-amplified`)
    is how the Hub labels what the model does to safety behaviour: a card without them is refused.
    """
    block = _front_matter(text)
    if block is None:
        raise RefusalEditError(
            f"{CARD} has no YAML metadata block (--- ... --- at the top); delete it to have one generated from {RECORD}"
        )
    try:
        meta = yaml.safe_load(block)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 2})" if where is not None else ""
        raise RefusalEditError(f"{CARD} metadata is not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise RefusalEditError(f"{CARD} metadata must be a YAML mapping, not {type(meta).__name__}")
    expected = card_metadata(record)
    missing = [k for k in expected if meta.get(k) in (None, "", [])]
    if missing:
        raise RefusalEditError(f"{CARD} metadata lacks {', '.join(missing)} (expected e.g. {missing[0]}: ...)")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    bases = meta["base_model"] if isinstance(meta["base_model"], list) else [meta["base_model"]]
    for base in bases:
        try:
            validate_repo_id(base if isinstance(base, str) else None)
            if not isinstance(base, str):
                raise HFValidationError("not a string")
        except HFValidationError:
            raise RefusalEditError(
                f"{CARD} metadata: base_model {base!r} is not a Hub model id (ORG/NAME); fix it in {CARD} "
                "or re-run orthogonalize with --base-model"
            ) from None
    tags = meta["tags"]
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise RefusalEditError(f"{CARD} metadata: tags must be a list of strings")
    lacking = [t for t in expected["tags"] if t not in tags]
    if lacking:
        raise RefusalEditError(f"{CARD} metadata: tags must include {', '.join(lacking)} (what this edit does)")
    return meta


def check_folder(path: Path) -> UploadPlan:
    """Decide offline what a push of `path` sends; raise a one-line error if the folder is not a whole model.

    Never writes to the folder: if the card is missing it is rendered from `refusal_edit.json` and kept
    in memory.
    """
    root = Path(path)
    if not root.is_dir():
        raise RefusalEditError(f"model folder not found: {root}")
    ckpt = open_checkpoint(root)  # config.json, weights, index and every shard header (truncation included)
    listed = {s.path.name for s in ckpt.shards}
    unlisted = sorted(p.name for p in root.glob("*.safetensors") if p.name not in listed)
    if unlisted:
        raise RefusalEditError(
            f"{unlisted[0]} in {root} is not part of the checkpoint ({INDEX} does not list it); remove it"
        )
    if not (root / "tokenizer_config.json").is_file():
        raise RefusalEditError(f"incomplete model folder {root}: missing tokenizer_config.json")
    if not any((root / name).is_file() for name in TOKENIZER_FILES):
        raise RefusalEditError(f"incomplete model folder {root}: missing tokenizer (tokenizer.json or tokenizer.model)")
    record = read_record(root)
    if record is None:
        raise RefusalEditError(
            f"incomplete model folder {root}: missing {RECORD} (the edit record written by orthogonalize)"
        )

    card_path = root / CARD
    generated = not card_path.is_file()
    if generated:
        card = render_card(record)
    else:
        try:
            card = card_path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise RefusalEditError(f"{CARD} is not UTF-8 text") from None
    metadata = validate_card(card, record)

    keep, skipped = _walk(root)
    files = [UploadFile(p.relative_to(root).as_posix(), p.stat().st_size, source=p) for p in keep]
    if generated:
        data = card.encode("utf-8")
        files.append(UploadFile(CARD, len(data), content=data))
        files.sort(key=lambda f: f.path_in_repo)
    return UploadPlan(root, files, skipped, record, card, generated, metadata)


# --------------------------------------------------------------------------------------------- credentials


def resolve_endpoint(endpoint: str | None = None) -> str:
    """The Hub base URL: explicit, else HF_ENDPOINT read now (not at import), else huggingface.co."""
    url = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise RefusalEditError(f"Hub endpoint must be an http(s) URL, not {url!r} (check HF_ENDPOINT)")
    return url


def _token_file() -> Path:
    """Where `hf auth login` stores the token, resolved from the environment at call time."""
    if os.environ.get("HF_TOKEN_PATH"):
        return Path(os.path.expandvars(os.path.expanduser(os.environ["HF_TOKEN_PATH"])))
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return Path(os.path.expandvars(os.path.expanduser(home))) / "token"


def resolve_token(explicit: str | None = None) -> str:
    """The token to write with: --token, then HF_TOKEN, then the login cache.

    The value is only ever passed to the Hub client; it is never printed, logged or stored.
    """
    for candidate in (explicit, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")):
        if candidate and candidate.strip():
            return candidate.strip()
    try:
        cached = _token_file().read_text().strip()
    except (OSError, UnicodeDecodeError):
        cached = ""
    if cached:
        return cached
    raise RefusalEditError(NO_TOKEN)


# --------------------------------------------------------------------------------------------- hub errors


def _one_line(text: str, token: str | None) -> str:
    if token:
        text = text.replace(token, "***")
    return " ".join(text.split())


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network failures of whichever HTTP stack huggingface_hub uses (httpx2 in 2.x, httpx in 1.x)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError, socket.gaierror]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _status(exc: Any) -> int:
    response = getattr(exc, "response", None)
    return response.status_code if response is not None else 0


class _Hub:
    """Translates every Hub failure into one line that names the endpoint or repo and never the token."""

    def __init__(self, endpoint: str, token: str, repo_id: str, revision: str) -> None:
        self.endpoint, self.token, self.repo_id, self.revision = endpoint, token, repo_id, revision

    @contextlib.contextmanager
    def errors(self, stage: str) -> Iterator[None]:
        try:
            yield
        except RefusalEditError as exc:
            raise RefusalEditError(_one_line(str(exc), self.token)) from None
        except Exception as exc:
            error = self.translate(exc, stage)
            if error is None:
                raise
            raise error from None

    def translate(self, exc: BaseException, stage: str) -> RefusalEditError | None:
        """The user-facing error for a failed Hub call, or None for a bug that should keep its traceback."""
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RevisionNotFoundError

        if isinstance(exc, OfflineModeIsEnabled):
            text = f"offline mode is on (HF_HUB_OFFLINE): cannot reach {self.endpoint}; unset it or use --dry-run"
        elif isinstance(exc, HfHubHTTPError):
            text = self._http_message(exc, stage, isinstance(exc, RevisionNotFoundError))
        elif isinstance(exc, ValueError) and "Invalid metadata in README.md" in str(exc):
            detail = str(exc).split("README.md.", 1)[-1].strip(" -\n")
            text = f"the Hub rejected the model card metadata: {detail}"
        elif isinstance(exc, _transport_errors()):
            reason = str(exc) or type(exc).__name__
            text = f"cannot reach the Hub at {self.endpoint} ({reason}); check your connection or HF_ENDPOINT"
        elif isinstance(exc, OSError):
            text = f"{stage} failed while reading the folder: {exc}"
        else:
            return None
        return RefusalEditError(_one_line(text, self.token))

    def _http_message(self, exc: Any, stage: str, revision_missing: bool) -> str:
        status = _status(exc)
        server = exc.server_message or str(exc).strip().split("\n", 1)[0]
        if status == 401 and (stage == "whoami" or "Invalid credentials" in server):
            return (
                f"the Hub at {self.endpoint} rejected the token (401 Unauthorized): check --token / HF_TOKEN "
                "or run `hf auth login`"
            )
        if status == 403:
            return (
                f"you cannot write to {self.repo_id}: the Hub refused ({stage}: 403 Forbidden: {server}); push to "
                "your own namespace or an organization where your token has write access"
            )
        if revision_missing:
            return f"revision {self.revision!r} does not exist in {self.repo_id} and could not be created"
        if status in (401, 404):
            return f"{self.repo_id} not found at {self.endpoint}, or the token cannot see it ({stage}: {status})"
        return f"{stage} for {self.repo_id} failed at {self.endpoint}: HTTP {status}: {server}"


# --------------------------------------------------------------------------------------------- push


def _default_message(record: dict[str, Any], metadata: dict[str, Any]) -> str:
    base = metadata.get("base_model")
    base = ", ".join(base) if isinstance(base, list) else base
    return f"Upload refusal-edit checkpoint ({record.get('mode', 'edit')} of {base})"


def _check_repo_id(repo: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise RefusalEditError(f"invalid repo id {repo!r}: expected OWNER/NAME (letters, digits, - _ .)") from None


def _repo_url(endpoint: str, repo_id: str, revision: str) -> str:
    return f"{endpoint}/{repo_id}" + ("" if revision == "main" else f"/tree/{revision}")


def push_folder(
    path: Path,
    repo: str,
    *,
    public: bool = False,
    revision: str = "main",
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    dry_run: bool = False,
    plan: UploadPlan | None = None,
) -> PushResult:
    """Publish the edited checkpoint in `path` as one commit to the model repo `repo`.

    New repos are private unless `public`; an existing public repo needs `public` too, so an edited model
    never becomes public by accident. A dry run performs every local check and contacts nothing. `plan`
    (from `check_folder(path)`) avoids checking the folder twice.
    """
    plan = plan if plan is not None else check_folder(Path(path))
    _check_repo_id(repo)
    revision = (revision or "main").strip()
    if not revision or SHA_RE.fullmatch(revision):
        raise RefusalEditError(f"--revision must name a branch, not {revision!r}")
    url = resolve_endpoint(endpoint)
    if dry_run:
        return PushResult(
            repo_id=repo,
            revision=revision,
            endpoint=url,
            url=_repo_url(url, repo, revision),
            private=not public,
            created=False,
            dry_run=True,
            plan=plan,
        )
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # huggingface_hub honours both
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            raise RefusalEditError(f"offline mode is on ({var}): cannot reach {url}; unset it or use --dry-run")
    secret = resolve_token(token)

    from huggingface_hub import HfApi

    api = HfApi(endpoint=url, token=secret, library_name="refusal-edit", library_version=__version__)
    hub = _Hub(url, secret, repo, revision)
    notes: list[str] = []

    with hub.errors("whoami"):
        who = api.whoami()
    user = who.get("name") if isinstance(who, dict) else None
    if "/" not in repo:
        if not user:
            raise RefusalEditError(f"give the repo as OWNER/NAME: the Hub did not say whose token this is ({repo})")
        repo = f"{user}/{repo}"
        hub.repo_id = repo
    owner = repo.split("/", 1)[0]
    if isinstance(who, dict) and who.get("type", "user") == "user" and user:
        orgs = {o.get("name") for o in who.get("orgs") or [] if isinstance(o, dict)}
        if owner != user and owner not in orgs:
            raise RefusalEditError(
                f"you cannot write to {repo}: the token belongs to {user}, who is not a member of {owner}"
            )
    role = ((who.get("auth") or {}).get("accessToken") or {}).get("role") if isinstance(who, dict) else None
    if role == "read":
        raise RefusalEditError(f"you cannot write to {repo}: the token is read-only (create a write token)")

    created, private = _ensure_repo(api, hub, repo, public)
    if not created and private is False and not public:
        raise RefusalEditError(
            f"{repo} already exists and is public: pass --public to push to it (pushes are private by default)"
        )
    if not created and private and public:
        notes.append(f"{repo} already exists and stays private (--public does not change an existing repo)")

    if revision != "main" and not revision.startswith("refs/"):
        with hub.errors("create branch"):
            api.create_branch(repo, branch=revision, exist_ok=True)

    operations = [f.operation() for f in plan.files]
    message = commit_message or _default_message(plan.record, plan.metadata)
    with hub.errors("commit"):
        info = api.create_commit(repo, operations, commit_message=message, revision=revision)
    return PushResult(
        repo_id=repo,
        revision=revision,
        endpoint=url,
        url=_repo_url(url, repo, revision),
        private=private,
        created=created,
        dry_run=False,
        plan=plan,
        commit_url=str(info.commit_url),
        commit_oid=str(info.oid),
        unchanged=[op.path_in_repo for op in operations if _unchanged(op)],
        notes=notes,
    )


def _unchanged(op: Any) -> bool:
    """Whether the Hub already had this file (the client then leaves it out of the commit).

    Reads huggingface_hub's bookkeeping on the operation; if that ever changes, files count as sent.
    """
    try:
        remote = getattr(op, "_remote_oid", None)
        return remote is not None and remote == op._local_oid
    except Exception:
        return False


def _ensure_repo(api: Any, hub: _Hub, repo: str, public: bool) -> tuple[bool, bool | None]:
    """Create the repo, or accept it if it exists: (created, private).

    As in `create_repo(exist_ok=True)`, a 409 means the repo exists, and a 403 on create is not final when
    the repo exists and is visible (a fine-grained token may write to a repo without being allowed to create
    in its namespace): the commit then decides.
    """
    from huggingface_hub.errors import HfHubHTTPError

    with hub.errors("create repo"):
        try:
            api.create_repo(repo, private=not public)
            return True, not public
        except HfHubHTTPError as exc:
            if _status(exc) not in (403, 409):
                raise
            first = exc
    try:
        with hub.errors("repo info"):
            info = api.repo_info(repo)
    except RefusalEditError:
        if _status(first) == 409:
            raise
        raise hub.translate(first, "create repo") or RefusalEditError(str(first)) from None
    return False, getattr(info, "private", None)
