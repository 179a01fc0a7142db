"""Publishing edited checkpoints on the Hugging Face Hub (`refusal-edit push`): `plan` decides offline
what would go up, `push` talks to the Hub."""

from refusal_edit.hub.plan import UploadFile, UploadPlan, check_folder
from refusal_edit.hub.push import NO_TOKEN, PushResult, check_revision, push_folder, resolve_endpoint, resolve_token

__all__ = [
    "NO_TOKEN",
    "PushResult",
    "UploadFile",
    "UploadPlan",
    "check_folder",
    "check_revision",
    "push_folder",
    "resolve_endpoint",
    "resolve_token",
]
