"""Planted bugs the suite must catch: each mutant is a search/replace in a temporary copy of the checkout.

A mutant names a file, its exact old text (which must occur exactly once: a mutant whose text moved fails
loudly instead of silently testing nothing) and the new text, and the tests that should kill it. It is
killed when those tests fail (pytest exit 1); anything else - the tests passing, a collection error, an
interrupted run - is reported as a survivor. These are the bugs a reference shared with the edit would hide.

`python tests/mutants.py` (make mutants) runs every mutant; `--fast` the CI subset (tests/test_mutants.py);
names select mutants. Two copies of the checkout run mutants side by side (the tests use one thread each).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the checkout
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments: the tests that should kill it
    fast: bool = True  # part of the CI subset


EXACT = "tests/test_orthogonalize_exact.py"
VARIANTS = "tests/test_variants.py"

MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "gemma2-gain-w",  # Gemma 2 / 3 apply (1 + w): read as w
        "refusal_edit/arch.py",
        "    norm_offset=1.0,\n    embed_scale=_sqrt_hidden,\n",
        "    norm_offset=0.0,\n    embed_scale=_sqrt_hidden,\n",
        (VARIANTS, "-k", "gemma2 and (hook_twin or norm_preservation)"),
    ),
    Mutant(
        "olmo2-gain-1+w",  # OLMo 2 applies w: read as 1 + w
        "refusal_edit/arch.py",
        "    norm_offset=0.0,\n    embed_scale=_one,\n",
        "    norm_offset=1.0,\n    embed_scale=_one,\n",
        (VARIANTS, "-k", "olmo2 and (hook_twin or norm_preservation)"),
    ),
    Mutant(
        "sandwich-gain-ignored",  # normalize(g * r) -> r, in the edit and its hook twin alike
        "refusal_edit/linalg.py",
        "return orthonormal(basis * gain.to(basis.device, torch.float32))",
        "return orthonormal(basis)",
        (VARIANTS, "-k", "gemma3_text and hook_twin"),
    ),
    Mutant(
        "experts-layout-transposed",  # gpt-oss stores [E, I, H] (I = H in the tiny model): read as [E, H, I]
        "refusal_edit/arch.py",
        'layer_tensor("mlp.experts.down_proj", "experts_t", "mlp")',
        'layer_tensor("mlp.experts.down_proj", "experts", "mlp")',
        (EXACT, "-k", "ablation and gpt_oss"),
    ),
    Mutant(
        "residual-bias-left-out",  # output-projection biases are not edited
        "refusal_edit/arch.py",
        '                layer_tensor(f"{module}.bias", "bias", site, layers),  # type: ignore[arg-type]\n',
        "",
        (EXACT, "-k", "ablation and llama"),
    ),
    Mutant(
        "embedding-skipped",  # the embedding gets weight 0, in the edit and its hook twin alike
        "refusal_edit/edits/spec.py",
        'out.alphas["embedding", None] = float(spec.embedding)',
        'out.alphas["embedding", None] = 0.0',
        (EXACT, "-k", "ablation and qwen2 and not moe"),
    ),
    Mutant(
        "gguf-gemma-gain-read-as-stored",  # llama.cpp stores Gemma's gain as 1 + w: read back without the - 1
        "refusal_edit/gguf/hf_view.py",
        "values = values - np.float32(self.spec.norm_offset)",
        "values = values",
        ("tests/test_gguf.py", "-k", "gemma_norm_gain"),
    ),
    Mutant(
        "addition-hook-ignores-multiplier",  # the product's attn-site addition hook forgets Granite's multiplier
        "refusal_edit/interventions.py",
        "        w = v / scale\n",
        "        w = v\n",
        (EXACT, "-k", "add and granite and attn"),
        fast=False,
    ),
    Mutant(
        "resharding-drops-transforms",  # --max-shard-size copies the source tensors unedited
        "refusal_edit/edits/write.py",
        "        chunks[-1].append(item)\n",
        "        chunks[-1].append(_Item(item.name, item.out, item.source, None))\n",
        ("tests/test_edit_io.py", "-k", "resharding"),
    ),
    Mutant(
        "control-vector-one-layer-late",  # direction.L instead of direction.(L-1) for the input of HF layer L
        "refusal_edit/gguf/cvec.py",
        'return f"direction.{layer - 1}"',
        'return f"direction.{layer}"',
        ("tests/test_gguf.py", "-k", "control_vector"),
    ),
)


class StaleMutant(RuntimeError):
    """The mutant's old text is not in its file exactly once: the code moved, update the mutant."""


def check(mutant: Mutant, root: Path = ROOT) -> str:
    """The file's text, after checking that the old text occurs exactly once."""
    path = root / mutant.file
    text = path.read_text() if path.is_file() else ""
    count = text.count(mutant.old)
    if count != 1:
        where = "is missing" if not path.is_file() else f"occurs {count} times (must be exactly once)"
        raise StaleMutant(f"mutant {mutant.name}: its old text in {mutant.file} {where}; update tests/mutants.py")
    return text


SKIP = shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info")


def copy_checkout(dest: Path) -> Path:
    """The checkout's files as git sees them (tracked and new, not ignored): no venv, caches or runs. Outside
    a git checkout (an unpacked archive), everything but those."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True
    )
    if listed.returncode != 0 or not listed.stdout:
        shutil.copytree(ROOT, dest, ignore=SKIP)
        return dest
    for name in filter(None, (n.decode() for n in listed.stdout.split(b"\0"))):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@dataclass
class Outcome:
    mutant: Mutant
    killed: bool
    code: int
    failed: list[str]
    seconds: float
    tail: str


def _env(copy: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTEST_ADDOPTS", None)
    return env


def _imports_the_copy(copy: Path) -> None:
    """The copy's package must shadow the installed (editable) one, or every mutant would survive."""
    code = "import refusal_edit, sys; sys.stdout.write(refusal_edit.__file__)"
    where = subprocess.run([sys.executable, "-c", code], cwd=copy, env=_env(copy), capture_output=True, text=True)
    if not Path(where.stdout).resolve().is_relative_to(copy.resolve()):
        raise RuntimeError(f"the mutants' copy imports refusal_edit from {where.stdout or where.stderr}")


def run_one(mutant: Mutant, copy: Path) -> Outcome:
    """Plant the mutant in `copy`, run its tests there, restore the file."""
    original = check(mutant, copy)
    path = copy / mutant.file
    path.write_text(original.replace(mutant.old, mutant.new))
    t0 = time.time()
    try:
        res = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *mutant.tests],
            cwd=copy,
            env=_env(copy),
            capture_output=True,
            text=True,
        )
    finally:
        path.write_text(original)
    failed = re.findall(r"^FAILED (\S+)", res.stdout, flags=re.MULTILINE)
    return Outcome(mutant, res.returncode == 1 and bool(failed), res.returncode, failed, time.time() - t0, res.stdout)


def run(mutants: list[Mutant], workers: int = 2) -> list[Outcome]:
    """Every mutant in its own run, `workers` copies of the checkout side by side; stale ones fail first."""
    for m in mutants:
        check(m)
    with tempfile.TemporaryDirectory(prefix="refusal-edit-mutants-") as tmp:
        copies = [copy_checkout(Path(tmp) / f"copy{i}") for i in range(max(1, min(workers, len(mutants))))]
        _imports_the_copy(copies[0])
        free = list(copies)

        def task(m: Mutant) -> Outcome:
            copy = free.pop()
            try:
                return run_one(m, copy)
            finally:
                free.append(copy)

        with ThreadPoolExecutor(len(copies)) as pool:
            return list(pool.map(task, mutants))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--fast", action="store_true", help="only the CI subset")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if (not args.names or m.name in args.names) and (m.fast or not args.fast)]
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        print(f"unknown mutants: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    try:
        outcomes = run(chosen, args.workers)
    except StaleMutant as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for o in outcomes:
        verdict = "killed" if o.killed else f"SURVIVED (pytest exit {o.code})"
        print(f"{o.mutant.name:32s} {verdict:10s} {o.seconds:5.1f} s  {', '.join(o.failed) or '-'}")
        if not o.killed:
            print(o.tail[-3000:], file=sys.stderr)
    survivors = [o.mutant.name for o in outcomes if not o.killed]
    print(f"{len(outcomes) - len(survivors)} of {len(outcomes)} mutants killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
