"""The `push` workflow: decide offline what a folder puts on the Hub (`plan_push`), then send it (`push`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from refusal_edit.hub import PushResult, UploadPlan, check_folder, check_revision, push_folder
from refusal_edit.hub.plan import default_repo


@dataclass
class PushJob:
    """What would go up, and where: `repo` is the one given, else the default (`repo_defaulted`)."""

    folder: Path
    plan: UploadPlan
    repo: str
    repo_defaulted: bool


def plan_push(
    folder: Path,
    include: Sequence[str] = (),
    base_model: str | None = None,
    revision: str = "main",
    repo: str | None = None,
) -> PushJob:
    """Check the revision and the folder (record, card, files) before anything is contacted."""
    check_revision(revision)
    plan = check_folder(folder, tuple(include), base_model)
    return PushJob(folder, plan, repo or default_repo(plan.record, folder), repo is None)


def push(
    job: PushJob,
    public: bool = False,
    revision: str = "main",
    commit_message: str | None = None,
    token: str | None = None,
    dry_run: bool = False,
) -> PushResult:
    """Upload the planned files as one commit (`hub.push_folder`; `dry_run` contacts nothing)."""
    return push_folder(
        job.folder,
        job.repo,
        public=public,
        revision=revision,
        commit_message=commit_message,
        token=token,
        dry_run=dry_run,
        plan=job.plan,
    )
