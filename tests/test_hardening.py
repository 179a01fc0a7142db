"""Hardening, round 2 (issue 28): no silent no-op, no edit by another model's direction, no traceback, no late
failure, no leftovers, and newcomer paths that say the fix.

Each case asserts the behaviour a user sees: the exit code, one line naming the problem (and the flag that
fixes it), and what is on disk afterwards (nothing written, nothing left, the input unchanged).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_direction
from tiny import HIDDEN, build, save

from refusal_edit.checkpoint import atomic
from refusal_edit.checkpoint.atomic import TMP_MARK, atomic_dir
from refusal_edit.checkpoint.record import RECORD, EditRecord
from refusal_edit.directions import identity
from refusal_edit.directions.artifacts import load_direction, save_direction
from refusal_edit.errors import RefusalEditError
from refusal_edit.prompts.sets import load_prompts

FAST_EXTRACT = [
    "--n-train", "6", "--n-val", "4", "--batch-size", "8", "--top-k", "2",
    "--kl-threshold", "1e9", "--induce-threshold", "-1e9", "--refusal-tokens", "i,as",
]  # fmt: skip
FAST_EVAL = ["--n-test", "3", "--max-new-tokens", "3", "--batch-size", "3", "--borderline", "none"]


def flat(text: str) -> str:
    return " ".join(text.split())


def error_line(res) -> str:
    """The one error line of a failed command (no traceback, nothing else on stderr)."""
    assert res.code != 0, res.text
    assert "Traceback" not in res.text
    lines = [ln for ln in res.err.splitlines() if ln.strip() and not ln.startswith("device auto: ")]  # said once loaded
    assert len(lines) == 1, res.err
    return lines[0]


def files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def direction_of(path: Path, config: dict, name: str, layer: int = 2, seed: int = 5, weights: str | None = None):
    """A direction file that records `config`'s model as its source (what extract writes)."""
    torch.manual_seed(seed)
    meta = {"layer": layer, "position": -1, "model": name}
    meta[identity.IDENTITY_KEY] = json.dumps(identity.identity(config, name, weights))
    save_direction(path, torch.randn(config.get("hidden_size", HIDDEN)), meta)
    return path


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny models: a llama, a qwen2 of the same hidden size, a deeper llama, a wider llama."""
    root = tmp_path_factory.mktemp("hardening")
    return {
        "llama": save(build("llama"), root / "llama"),
        "qwen2": save(build("qwen2"), root / "qwen2"),
        "deep": save(build("llama", num_hidden_layers=4), root / "deep"),
        "wide": save(build("llama", hidden_size=48, head_dim=12), root / "wide"),
    }


@pytest.fixture
def llama(models) -> Path:
    return models["llama"]


# ------------------------------------------------------------------------------------------ silent no-ops


@pytest.mark.parametrize("layers", ["5:9", "3:", "2:4", "99", "3"])
def test_a_layer_selection_outside_the_model_is_an_error(llama, tmp_path, cli, layers):
    d = direction_of(tmp_path / "d.safetensors", config_of(llama), "llama")
    res = cli("orthogonalize", llama, "--direction", d, "--layers", layers, "--out", tmp_path / "out")
    assert f"--layers {layers if ':' in layers else f'{layers}:{int(layers) + 1}'} is out of range: the model has " \
        "3 layers" in error_line(res)  # fmt: skip
    assert not (tmp_path / "out").exists()
    plan = cli("orthogonalize", llama, "--direction", d, "--layers", layers, "--plan-only")
    assert "is out of range" in error_line(plan)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--weight", "0"], "this edit changes no tensor"),
        (["--mode", "add", "--coeff", "0"], "the vector to add is zero (--coeff 0?): this edit changes no tensor"),
    ],
)
def test_an_edit_that_changes_no_tensor_is_an_error(llama, tmp_path, cli, options, message):
    d = direction_of(tmp_path / "d.safetensors", config_of(llama), "llama")
    res = cli("orthogonalize", llama, "--direction", d, *options, "--out", tmp_path / "out")
    assert message in error_line(res)
    assert not (tmp_path / "out").exists()


def test_the_edges_of_the_model_are_accepted(llama, tmp_path, cli):
    d = direction_of(tmp_path / "d.safetensors", config_of(llama), "llama")
    for i, layers in enumerate(["0:3", "2", ":1", "2:"]):
        res = cli("orthogonalize", llama, "--direction", d, "--layers", layers, "--out", tmp_path / f"out{i}")
        assert res.code == 0, (layers, res.text)


# ------------------------------------------------------------------------------------------ foreign directions


@pytest.mark.parametrize(
    ("source", "differs"), [("qwen2", "model type"), ("deep", "layer count"), ("wide", "hidden size")]
)
def test_a_direction_from_another_model_is_an_error_naming_both(models, tmp_path, cli, source, differs):
    llama = models["llama"]
    d = direction_of(tmp_path / "d.safetensors", config_of(models[source]), source)
    res = cli("orthogonalize", llama, "--direction", d, "--out", tmp_path / "out")
    line = flat(error_line(res))
    assert f"the direction d.safetensors was extracted from {source} (" in line
    assert "not from the model being edited, llama (llama, hidden 32, 3 layers)" in line
    assert f"they differ in {differs}; pass --allow-foreign-direction to apply it anyway" in line
    assert not (tmp_path / "out").exists()
    variant = cli("orthogonalize", llama, "--direction", d, "--layers", "0:2", "--plan-only")  # a spec: the same
    assert "--allow-foreign-direction" in error_line(variant)


def test_a_foreign_direction_on_purpose_is_written_and_said_in_record_and_card(models, tmp_path, cli):
    d = direction_of(tmp_path / "d.safetensors", config_of(models["qwen2"]), "qwen2")
    res = cli(
        "orthogonalize", models["llama"], "--direction", d, "--out", tmp_path / "out", "--allow-foreign-direction",
        "--base-model", "org/llama",
    )  # fmt: skip
    assert res.code == 0, res.text
    assert "foreign direction applied on purpose: the direction d.safetensors was extracted from qwen2" in flat(res.err)
    record = EditRecord.load(tmp_path / "out")
    assert any(n.startswith("foreign direction applied on purpose") for n in record.notes)
    assert "foreign direction applied on purpose" in (tmp_path / "out" / "README.md").read_text()


def test_a_direction_without_a_recorded_source_still_loads_and_says_so(llama, tmp_path, cli):
    make_direction(tmp_path / "old.safetensors")  # no source_model metadata: an older file
    assert load_direction(tmp_path / "old.safetensors").source_model is None
    res = cli("orthogonalize", llama, "--direction", tmp_path / "old.safetensors", "--out", tmp_path / "out")
    assert res.code == 0, res.text
    assert "does not record its source model (written by an older version): not checked" in flat(res.err)


def test_identity_rules():
    config = {"model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "vocab_size": 151936}
    base = identity.identity(config, "qwen", "a" * 64)
    assert identity.mismatch(base, identity.identity(config, "copy", "a" * 64)) is None
    other = identity.identity(config, "coder", "b" * 64)  # same config, other weights: a fine-tune
    assert identity.mismatch(base, other) == "weights (sha256)"
    assert identity.mismatch(base, other, edited=True) is None  # an edit's weights differ by design
    assert identity.mismatch(base, identity.identity(config, "unknown weights")) is None
    fewer = {k: v for k, v in config.items() if k != "vocab_size"}  # a GGUF's derived config: fewer keys
    assert identity.mismatch(base, identity.identity(fewer, "gguf")) is None
    wrapped = {"model_type": "qwen2", "text_config": {**config, "hidden_size": 1024}}
    assert identity.mismatch(base, identity.identity(wrapped, "vl")) == "hidden size"  # the text config counts
    with pytest.raises(RefusalEditError, match="allow_foreign_direction"):
        identity.check(base, other, "the direction d")
    assert identity.check(base, other, "d", allow=True).startswith("foreign direction applied on purpose")


def test_extract_records_the_source_model(models, tmp_path, cli):
    src = models["qwen2"]
    (tmp_path / "harmful.txt").write_text("\n".join(f"harmful request number {i}" for i in range(40)))
    res = cli("extract", src, "--out", tmp_path / "run", "--harmful", tmp_path / "harmful.txt", *FAST_EXTRACT)
    assert res.code == 0, res.text
    d = load_direction(tmp_path / "run")
    assert d.source_model["name"] == "qwen2" and d.n_layers == 3
    assert d.source_model["config_sha256"] == identity.identity(config_of(src))["config_sha256"]
    # the split of a user's file is stated up front, with the way to evaluate on its held-out part
    split = next(ln for ln in res.err.splitlines() if ln.startswith("harmful prompts"))
    counts = load_prompts(str(tmp_path / "harmful.txt")).split_counts()
    assert f"40 rows split 70/15/15 (train/val/test) by a hash of each prompt: {counts['train']} train" in split
    assert f"evaluate on the held-out part with {tmp_path / 'harmful.txt'}@test" in flat(res.err)
    foreign = cli("orthogonalize", models["llama"], "--direction", tmp_path / "run", "--out", tmp_path / "out")
    assert "was extracted from qwen2 (qwen2, hidden 32, 3 layers)" in error_line(foreign)
    own = cli("orthogonalize", src, "--direction", tmp_path / "run", "--out", tmp_path / "own")
    assert own.code == 0, own.text


# ------------------------------------------------------------------------------------------ export-cvec


def test_export_cvec_layers_are_bounded_by_the_direction_s_model(llama, tmp_path, cli):
    d = direction_of(tmp_path / "d.safetensors", config_of(llama), "llama", layer=2)
    res = cli("export-cvec", d, "--layers", "99", "--out", tmp_path / "c.gguf")
    assert "--layers 99 is out of range: the model has 3 layers" in error_line(res)
    assert not (tmp_path / "c.gguf").exists()
    to_end = cli("export-cvec", d, "--layers", "2:", "--out", tmp_path / "c.gguf")  # A: needs no --model now
    assert to_end.code == 0, to_end.text


def test_export_cvec_default_at_layer_0_or_1_names_real_flags(llama, tmp_path, cli):
    d = direction_of(tmp_path / "d.safetensors", config_of(llama), "llama", layer=1)
    line = error_line(cli("export-cvec", d, "--out", tmp_path / "c.gguf"))
    assert "extract chose layer 1" in line and "pass --layers 2 (or later)" in line
    assert "refusal-edit orthogonalize MODEL --direction DIRECTION --mode add" in line and "`" not in line
    (tmp_path / "mine.gguf").write_bytes(b"user data")
    taken = error_line(cli("export-cvec", d, "--layers", "2", "--out", tmp_path / "mine.gguf", "--force"))
    assert "--replace-any replaces it" in taken
    ok = cli("export-cvec", d, "--layers", "2", "--out", tmp_path / "mine.gguf", "--force", "--replace-any")
    assert ok.code == 0, ok.text


# ------------------------------------------------------------------------------------------ evaluate


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if any model is loaded: the checks under test must come first. (The workflows are
    imported before anything is patched, so none binds the stand-in for good.)"""
    from refusal_edit.workflows import evaluation, extraction, tune

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the check")

    for module in (evaluation, extraction, tune):
        monkeypatch.setattr(module, "load_model", loaded)


@pytest.mark.parametrize(("other", "why"), [("wide", "differ in hidden_size (48 vs 32)"), ("qwen2", "a qwen2 model")])
def test_evaluate_refuses_two_checkpoints_of_different_architectures(models, tmp_path, cli, no_loading, other, why):
    res = cli("evaluate", models["llama"], models[other], "--out", tmp_path / "rep", *FAST_EVAL)
    line = error_line(res)
    assert why in line and "evaluate compares two checkpoints of one architecture" in line
    assert not (tmp_path / "rep").exists()


@pytest.mark.parametrize("command", ["evaluate", "tune"])
def test_evaluate_and_tune_refuse_a_foreign_direction_before_loading(models, tmp_path, cli, no_loading, command):
    d = direction_of(tmp_path / "d.safetensors", config_of(models["deep"]), "deep")
    res = cli(command, models["llama"], "--direction", d, "--out", tmp_path / "rep")
    assert "they differ in layer count; pass --allow-foreign-direction" in error_line(res)
    assert not (tmp_path / "rep").exists()


@pytest.mark.parametrize("command", ["extract", "evaluate", "tune"])
def test_an_unwritable_out_fails_before_anything_is_loaded(llama, tmp_path, cli, no_loading, monkeypatch, command):
    direction = direction_of(tmp_path / "d.safetensors", config_of(llama), "llama")
    args = {
        "extract": FAST_EXTRACT,
        "evaluate": ["--direction", direction, *FAST_EVAL],
        "tune": ["--direction", direction],
    }
    args = args[command]
    proc = cli(command, llama, "--out", "/proc/refusal-edit-test/out", *args)  # no one writes in /proc
    assert "cannot write /proc/refusal-edit-test/out" in error_line(proc)

    real_mkdir = os.mkdir

    def read_only(path, *a, **kw):
        if f"{TMP_MARK}probe-" in str(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *a, **kw)

    monkeypatch.setattr(atomic.os, "mkdir", read_only)
    before = files(tmp_path)
    res = cli(command, llama, "--out", tmp_path / "new" / "out", *args)
    assert f"cannot write {tmp_path / 'new' / 'out'}: Read-only file system" in error_line(res)
    assert files(tmp_path) == before


def test_evaluate_on_a_full_disk_leaves_nothing_behind(llama, tmp_path, cli, monkeypatch):
    from refusal_edit.evaluation import report

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(report, "plot_report", full)
    d = make_direction(tmp_path / "d.safetensors").path
    before = files(tmp_path)
    res = cli("evaluate", llama, "--direction", d, "--out", tmp_path / "deep" / "rep", *FAST_EVAL)
    assert "disk full while writing" in error_line(res)
    assert files(tmp_path) == before  # no report folder, no parent, no temporary file


def test_prompts_longer_than_the_context_are_refused_and_said(llama, tmp_path, cli):
    (tmp_path / "long.txt").write_text("short one\n" + " ".join(["word"] * 2000) + "\nanother\n")
    d = make_direction(tmp_path / "d.safetensors").path
    res = cli("evaluate", llama, "--direction", d, "--harmful", tmp_path / "long.txt", "--out", tmp_path / "r",
              *FAST_EVAL)  # fmt: skip
    line = error_line(res)
    assert "harmful prompt 2 of" in line and "more than the model's context of 512 tokens" in line
    assert "refused, not truncated" in line and not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------ tracebacks


def test_a_model_folder_without_tokenizer_files(llama, tmp_path, cli, monkeypatch):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).symlink_to(llama / name)
    from refusal_edit.loading import model as loading

    monkeypatch.setattr(loading, "stock_model_class", lambda *a: pytest.fail("weights loaded first"), raising=False)
    res = cli("extract", bare, "--out", tmp_path / "run", *FAST_EXTRACT)
    assert "no tokenizer in" in error_line(res) and "tokenizer.json" in error_line(res)
    assert not (tmp_path / "run").exists()


def test_a_full_disk_inside_a_library_writer_is_one_line(tmp_path):
    from safetensors import SafetensorError

    out = tmp_path / "a" / "run"
    with pytest.raises(RefusalEditError, match=r"disk full while writing .*; nothing was written"), atomic_dir(out):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, message: "No space left" })')
    assert files(tmp_path) == set()


def _interrupted(args: list[str], delay: float, cwd: Path, sig: int = signal.SIGINT) -> subprocess.CompletedProcess:
    """Run the console script in its own process group with Ctrl-C's default action, press Ctrl-C after
    `delay` seconds (a background job of a non-interactive shell would otherwise ignore SIGINT)."""
    script = Path(sys.executable).with_name("refusal-edit")
    proc = subprocess.Popen(
        [script, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    time.sleep(delay)
    os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize(
    ("sig", "delay", "code", "message"),
    [
        (signal.SIGINT, 0.3, 130, "interrupted (Ctrl-C): stopped before the end"),
        (signal.SIGINT, 1.5, 130, "interrupted (Ctrl-C): stopped before the end"),
        (signal.SIGTERM, 0.3, 143, "terminated (SIGTERM): stopped before the end"),
    ],
)
def test_ctrl_c_or_sigterm_during_start_up_is_one_line(llama, tmp_path, sig, delay, code, message):
    """While the command line is still being imported (seconds on a busy machine). Earlier than ~0.1 s the
    signal lands in the interpreter's own start-up (site.py), before any of this package exists."""
    done = _interrupted(["extract", str(llama), "--out", "run", *FAST_EXTRACT], delay, tmp_path, sig)
    assert done.returncode == code, done.stderr
    assert done.stderr.strip() == message, done.stderr
    assert not (tmp_path / "run").exists()


def test_a_signal_after_the_command_finished_says_the_output_is_complete(tmp_path):
    """Ctrl-C while the interpreter shuts down (atexit handlers run; seconds with torch loaded)."""
    script = (
        "import atexit, os, signal, sys, time\n"
        "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(5)))\n"
        "sys.argv = ['refusal-edit', 'archs']\n"
        "from refusal_edit.entry import main\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 130 and "Traceback" not in done.stderr
    assert done.stderr.strip().endswith("interrupted (Ctrl-C) after the command had finished: its output is complete")


def test_ctrl_c_after_the_output_is_complete_says_so(llama, tmp_path, cli, monkeypatch):
    from refusal_edit.cli import orthogonalize as command

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "show", ctrl_c)  # while the results table is printed
    d = direction_of(tmp_path / "d.safetensors", config_of(llama), "llama")
    res = cli("orthogonalize", llama, "--direction", d, "--out", tmp_path / "out")
    assert res.code == 130
    assert f"interrupted (Ctrl-C): after the output was complete ({tmp_path / 'out'}: whole" in flat(res.err)
    assert EditRecord.load(tmp_path / "out") is not None and (tmp_path / "out" / RECORD).is_file()


def test_ctrl_c_during_tune_s_optuna_loop_is_not_logged_as_a_traceback(tmp_path, monkeypatch, capfd):
    from types import SimpleNamespace

    from refusal_edit.cli.app import quiet_libraries
    from refusal_edit.tuning import run as tuning
    from refusal_edit.tuning.space import SearchSpace

    class Scorer:
        calls = 0

        def score(self, spec, bank):
            Scorer.calls += 1
            if Scorer.calls == 3:
                raise KeyboardInterrupt
            return SimpleNamespace(refusal=0.5, kl=0.1, refusal_logodds=0.0)

    quiet_libraries()
    space = SearchSpace(n_layers=6, direction_layer=3, per_layer=True, harmless_means=False, preserve_norm=False)
    with pytest.raises(KeyboardInterrupt):
        tuning.search(Scorer(), space, None, tuning.TuneSettings(trials=8, refine=2, startup=2), tmp_path / "s")
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err and "KeyboardInterrupt" not in captured.err


# ------------------------------------------------------------------------------------------ newcomer paths


def test_a_mistyped_local_path_is_not_asked_of_the_hub(llama, tmp_path, cli, monkeypatch):
    import shutil

    shutil.copytree(llama, tmp_path / "m" / "qwen")
    monkeypatch.chdir(tmp_path)
    d = make_direction(tmp_path / "d.safetensors").path
    res = cli("orthogonalize", "m/qwne", "--direction", d, "--out", tmp_path / "out")
    assert error_line(res).endswith("model not found: no folder or file m/qwne; did you mean m/qwen?")


def test_an_unknown_base_model_says_the_fix(llama, tmp_path, cli):
    d = direction_of(tmp_path / "d.safetensors", config_of(llama), "llama")
    res = cli("orthogonalize", llama, "--direction", d, "--out", tmp_path / "out")
    assert res.code == 0, res.text
    assert "pass --base-model ORG/NAME here, or to push (refusal-edit push DIR --repo OWNER/NAME --base-model" in flat(
        res.err
    )


def test_a_held_out_part_of_a_user_file(tmp_path, cli):
    rows = [f"request {i}" for i in range(60)]
    (tmp_path / "p.txt").write_text("\n".join(rows))
    whole = load_prompts(str(tmp_path / "p.txt"))
    parts = {name: load_prompts(f"{tmp_path / 'p.txt'}@{name}").instructions for name in ("train", "val", "test")}
    assert sorted(p for part in parts.values() for p in part) == sorted(rows)  # a partition of the file
    assert parts["test"] == whole.split("test").instructions and not set(parts["test"]) & set(parts["train"])
    (tmp_path / "two.txt").write_text("a\nb\n")
    from refusal_edit.directions.extract import ExtractSettings, split_prompts

    with pytest.raises(RefusalEditError, match=r"split is empty \(2 rows, split 70/15/15 \(train/val/test\) by a"):
        tiny = load_prompts(str(tmp_path / "two.txt"))
        split_prompts(tiny, tiny, ExtractSettings())
    help_text = flat(cli("extract", "--help").out)
    assert "70/15/15" in help_text and "FILE@test" in help_text


def test_a_signal_during_an_import_is_held_until_the_import_is_over(tmp_path, monkeypatch):
    """A Ctrl-C inside numpy's or torch's initialisation left the module half-made: later imports failed with
    a RecursionError traceback and exit code 1 instead of the one-line interrupt. The handler holds it."""
    import importlib

    from refusal_edit.interrupt import raise_outside_imports, release_held

    (tmp_path / "slow_module_for_signals.py").write_text(
        "import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(0.2)\nDONE = True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    previous = signal.signal(signal.SIGINT, raise_outside_imports)
    try:
        with pytest.raises(KeyboardInterrupt):
            importlib.import_module("slow_module_for_signals")
            time.sleep(1)  # the held Ctrl-C arrives here, after the import, within ~20 ms
        assert sys.modules["slow_module_for_signals"].DONE  # the module was imported whole
        assert release_held() is None
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # outside an import: at once
            time.sleep(1)
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.modules.pop("slow_module_for_signals", None)
