"""Real weights through the derived path (issue 29): the demo model, SmolLM2 and gemma-3-270m edited with the
table disabled (`REFUSAL_EDIT_NO_TABLE=1`: their specs derived and verified on tiny instances of their own
configs) give byte-identical checkpoints to the table path. Three full edits twice over: `make archs-real`
(skipped in `make test` unless REFUSAL_EDIT_DERIVE_REAL=1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from refusal_edit.directions.artifacts import save_direction
from refusal_edit.loading import resolve_source

pytestmark = pytest.mark.skipif(
    os.environ.get("REFUSAL_EDIT_DERIVE_REAL") != "1", reason="make archs-real (REFUSAL_EDIT_DERIVE_REAL=1)"
)
EXE = str(Path(sys.executable).with_name("refusal-edit"))


def _edit(src: Path, direction: Path, out: Path, no_table: bool) -> str:
    env = {**os.environ, "REFUSAL_EDIT_QUIET": "1"}
    env.pop("REFUSAL_EDIT_NO_TABLE", None)
    if no_table:
        env["REFUSAL_EDIT_NO_TABLE"] = "1"
    args = [EXE, "orthogonalize", str(src), "--direction", str(direction), "--out", str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=3600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def _tensors(path: Path) -> dict[str, bytes]:
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as fh:
            out |= {k: fh.get_tensor(k).contiguous().view(torch.uint8).numpy().tobytes() for k in fh.keys()}
    return out


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma-3-270m", "qwen2.5-coder-0.5b-instruct"])
def test_derived_path_gives_byte_identical_edits_on_real_weights(name, tmp_path):
    source = resolve_source(name)
    import json

    hidden = json.loads((source.hf_dir / "config.json").read_text())
    hidden = hidden.get("text_config", hidden)["hidden_size"]
    torch.manual_seed(0)
    direction = save_direction(tmp_path / "d.safetensors", torch.randn(hidden), {"layer": 3, "position": -1})
    _edit(source.hf_dir, direction, tmp_path / "table", False)
    _edit(source.hf_dir, direction, tmp_path / "derived", True)
    assert _tensors(tmp_path / "table") == _tensors(tmp_path / "derived")
