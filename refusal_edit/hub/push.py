"""Push an edited checkpoint folder to the Hugging Face Hub, on huggingface_hub's own primitives.

What goes up is decided offline (`hub.plan`); this module only talks to the Hub: token, endpoint and
offline mode are the client's (`get_token`, `constants`), and the upload is one `create_commit` with the
plan's explicit file list, so what the dry run shows is what is committed. Ours on top of the client:
the dry run contacts nothing, repos are private by default (an existing public repo needs `public`
too), files the branch already holds are not re-sent, and every failure is one line without the token.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refusal_edit import __version__
from refusal_edit.checkpoint.record import hub_model_id
from refusal_edit.errors import RefusalEditError
from refusal_edit.hub.plan import UploadFile, UploadPlan, check_folder

NO_TOKEN = "no Hugging Face token: set HF_TOKEN, run `hf auth login`, or pass a token"
# git check-ref-format, as one pattern per rule a branch name can break.
_REF_RULES = (
    (r"[\x00-\x20\x7f]", "spaces or control characters"),
    (r"[~^:?*\[\\]", "any of ~ ^ : ? * [ \\"),
    (r"\.\.", "'..'"),
    (r"@\{", "'@{'"),
    (r"(^|/)\.|\.lock(/|$)|\.$", "a part that starts with '.' or ends with '.' or '.lock'"),
    (r"^/|/$|//|^@$", "an empty part, or is '@'"),
    (r"^[0-9a-f]{40}$", "a commit id instead of a branch"),
)


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
    commit_url: str | None = None  # None when nothing was committed (dry run, or every file unchanged)
    commit_oid: str | None = None
    unchanged: list[str] = field(default_factory=list)  # files the branch already had byte for byte (not re-sent)
    notes: list[str] = field(default_factory=list)


def check_revision(revision: str) -> str:
    """`revision` if git (and so the Hub) accepts it as a branch name, else a one-line error saying why not."""
    if not revision:
        raise RefusalEditError("revision must name a branch")
    for pattern, what in _REF_RULES:
        if re.search(pattern, revision):
            raise RefusalEditError(f"revision {revision!r} is not a valid branch name: it contains {what}")
    return revision


def check_repo_id(repo: str) -> str:
    if repo.count("/") > 1 or hub_model_id(repo if "/" in repo else f"user/{repo}") is None:
        raise RefusalEditError(f"invalid repo id {repo!r}: expected OWNER/NAME (letters, digits, - _ .)")
    return repo


def resolve_endpoint(endpoint: str | None = None) -> str:
    """The Hub base URL: explicit, else huggingface_hub's own (HF_ENDPOINT, read when it was imported)."""
    from huggingface_hub import constants

    url = (endpoint or constants.ENDPOINT).strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise RefusalEditError(f"Hub endpoint must be an http(s) URL, not {url!r} (check HF_ENDPOINT)")
    return url


def resolve_token(explicit: str | None = None) -> str:
    """The explicit token, else huggingface_hub's (HF_TOKEN, then `hf auth login`); never printed or stored."""
    from huggingface_hub import get_token

    token = (explicit or "").strip() or get_token()
    if not token:
        raise RefusalEditError(NO_TOKEN)
    return token


class _Hub:
    """Turns every failure of a Hub call into one line that names the endpoint or repo and never the token."""

    def __init__(self, endpoint: str, token: str, repo_id: str, revision: str) -> None:
        self.endpoint, self.token, self.repo_id, self.revision = endpoint, token, repo_id, revision

    @contextlib.contextmanager
    def errors(self, stage: str) -> Iterator[None]:
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

        try:
            yield
        except Exception as exc:
            if isinstance(exc, RefusalEditError):
                text = str(exc)
            elif isinstance(exc, OfflineModeIsEnabled):
                text = f"offline mode is on (HF_HUB_OFFLINE): cannot reach {self.endpoint}"
            elif isinstance(exc, HfHubHTTPError):
                text = self._http(exc, stage)
            elif isinstance(exc, ValueError) and "README.md" in str(exc):  # create_commit's validate-yaml check
                detail = str(exc).split("README.md.", 1)[-1].strip(" -\n")
                text = f"the Hub rejected the model card metadata: {detail}"
            elif isinstance(exc, ConnectionError | TimeoutError) or "TransportError" in {
                c.__name__ for c in type(exc).__mro__
            }:  # the HTTP stack's network failures, whichever stack it is
                text = f"cannot reach the Hub at {self.endpoint} ({exc or type(exc).__name__}); check HF_ENDPOINT"
            elif isinstance(exc, OSError):
                text = f"{stage} failed while reading the folder: {exc}"
            else:
                raise  # a bug: keep its traceback
            raise RefusalEditError(" ".join(text.replace(self.token, "***").split())) from None

    def _http(self, exc: Any, stage: str) -> str:
        from huggingface_hub.errors import RevisionNotFoundError

        status = exc.response.status_code if exc.response is not None else 0
        server = exc.server_message or str(exc).strip().split("\n", 1)[0]
        if status == 401 and (stage == "whoami" or "Invalid credentials" in server):
            return (
                f"the Hub at {self.endpoint} rejected the token (401 Unauthorized): check HF_TOKEN or `hf auth login`"
            )
        if status == 403:
            return (
                f"you cannot write to {self.repo_id}: the Hub refused ({stage}: 403 Forbidden: {server}); push to "
                "your own namespace or an organization where your token has write access"
            )
        if isinstance(exc, RevisionNotFoundError):
            return f"revision {self.revision!r} does not exist in {self.repo_id} and could not be created"
        if status in (401, 404):
            return f"{self.repo_id} not found at {self.endpoint}, or the token cannot see it ({stage}: {status})"
        return f"{stage} for {self.repo_id} failed at {self.endpoint}: HTTP {status}: {server}"


def _writable_repo(who: dict[str, Any], repo: str) -> str:
    """The full repo id (a bare NAME goes to the token's owner), refusing what whoami already rules out."""
    user = who.get("name")
    if "/" not in repo and not user:
        raise RefusalEditError(f"give the repo as OWNER/NAME: the Hub did not say whose token this is ({repo})")
    repo = repo if "/" in repo else f"{user}/{repo}"
    owner, orgs = repo.split("/", 1)[0], {o.get("name") for o in who.get("orgs") or []}
    if who.get("type", "user") == "user" and user and owner != user and owner not in orgs:
        raise RefusalEditError(
            f"you cannot write to {repo}: the token belongs to {user}, who is not a member of {owner}"
        )
    if ((who.get("auth") or {}).get("accessToken") or {}).get("role") == "read":
        raise RefusalEditError(f"you cannot write to {repo}: the token is read-only (create a write token)")
    return repo


def _unchanged(api: Any, repo: str, revision: str, files: list[UploadFile]) -> list[str]:
    """Files the branch already holds byte for byte: same size, then same LFS sha256 or git blob id."""
    ours = {f.path_in_repo: f for f in files}
    same = []
    for remote in api.get_paths_info(repo, list(ours), revision=revision):
        local = ours.get(remote.path)
        if local is None or not hasattr(remote, "blob_id") or remote.size != local.size:
            continue  # not ours, a folder, or a different size
        if remote.lfs is not None:
            match = remote.lfs.sha256 == local.digest("sha256")
        else:
            match = remote.blob_id == local.digest("sha1", b"blob %d\0" % local.size)
        same += [remote.path] if match else []
    return sorted(same)


def push_folder(
    path: str | Path,
    repo: str,
    *,
    public: bool = False,
    revision: str = "main",
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    dry_run: bool = False,
    plan: UploadPlan | None = None,
    include: tuple[str, ...] = (),
    base_model: str | None = None,
) -> PushResult:
    """Publish the edited checkpoint in `path` as one commit to the model repo `repo`.

    New repos are private unless `public`; an existing public repo needs `public` too, so an edited model
    never becomes public by accident. A dry run performs every local check and contacts nothing. `plan`
    (from `check_folder(path, include, base_model)`) avoids checking the folder twice.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError

    plan = plan if plan is not None else check_folder(Path(path), include, base_model)
    repo, revision, url = check_repo_id(repo), check_revision(revision), resolve_endpoint(endpoint)
    result = PushResult(repo, revision, url, f"{url}/{repo}", not public, False, dry_run, plan)
    if dry_run:
        return result
    if constants.HF_HUB_OFFLINE:
        raise RefusalEditError(f"offline mode is on (HF_HUB_OFFLINE): cannot reach {url}; unset it, or do a dry run")
    secret = resolve_token(token)
    api = HfApi(endpoint=url, token=secret, library_name="refusal-edit", library_version=__version__)
    hub = _Hub(url, secret, repo, revision)

    with hub.errors("whoami"):
        repo = hub.repo_id = result.repo_id = _writable_repo(api.whoami(), repo)
    result.url = f"{url}/{repo}" + ("" if revision == "main" else f"/tree/{revision}")
    with hub.errors("repo info"):
        try:
            result.private = api.repo_info(repo).private
        except RepositoryNotFoundError:
            result.created = True
    if result.created:
        with hub.errors("create repo"):
            api.create_repo(repo, private=not public, exist_ok=True)
    elif result.private is False and not public:
        raise RefusalEditError(f"{repo} already exists and is public: pushes are private unless public is set")
    elif result.private and public:
        result.notes.append(f"{repo} already exists and stays private (public does not change an existing repo)")
    if revision != "main" and not revision.startswith("refs/"):
        with hub.errors("create branch"):
            api.create_branch(repo, branch=revision, exist_ok=True)
    if not result.created:
        with hub.errors("compare"):
            result.unchanged = _unchanged(api, repo, revision, plan.files)
    files = [f for f in plan.files if f.path_in_repo not in result.unchanged]
    if not files:
        return result
    base = plan.metadata["base_model"]
    base = ", ".join(base) if isinstance(base, list) else base
    message = commit_message or f"Upload refusal-edit checkpoint ({plan.record.mode} of {base})"
    operations = [CommitOperationAdd(f.path_in_repo, f.content if f.generated else str(f.source)) for f in files]
    with hub.errors("commit"):
        info = api.create_commit(repo, operations, commit_message=message, revision=revision)
    result.commit_url, result.commit_oid = str(info.commit_url), str(info.oid)
    return result
