"""Library versions recorded with every artifact, so a result can be traced to what produced it."""

from __future__ import annotations

import platform

from refusal_edit import __version__


def versions() -> dict[str, str]:
    import safetensors
    import torch
    import transformers

    return {
        "refusal_edit": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }
