"""Publishing edited checkpoints on the Hugging Face Hub (`refusal-edit push`)."""

from refusal_edit.hub.push import (
    NO_TOKEN,
    PushResult,
    UploadFile,
    UploadPlan,
    check_folder,
    push_folder,
    resolve_endpoint,
    resolve_token,
    validate_card,
)

__all__ = [
    "NO_TOKEN",
    "PushResult",
    "UploadFile",
    "UploadPlan",
    "check_folder",
    "push_folder",
    "resolve_endpoint",
    "resolve_token",
    "validate_card",
]
