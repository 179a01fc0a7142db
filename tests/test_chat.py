"""`refusal-edit chat` (issue 32): one model, two side by side, and a hook edit, driven through the CLI with
scripted stdin; the streamed reply is the greedy reply, conversations are multi-turn, and the hook edit
answers exactly as the checkpoint orthogonalize writes."""

from __future__ import annotations

import io
import json
import sys

import pytest
from conftest import make_direction

from refusal_edit.generation import generate
from refusal_edit.loading.model import load_model
from refusal_edit.workflows.chat import open_chat

TOKENS = "12"  # tokens per reply: enough to differ, cheap on a tiny model


@pytest.fixture
def models(tiny_dir, tmp_path):
    base, other = tiny_dir("llama", "base"), tiny_dir("llama", "other", seed=1)
    return base, other, make_direction(tmp_path / "direction.safetensors").path


def chat_with(cli, monkeypatch, script: str, *args):
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    return cli("chat", *map(str, args), "--max-new-tokens", TOKENS)


def test_one_model_scripted_stdin(cli, monkeypatch, models):
    base, _, _ = models
    res = chat_with(cli, monkeypatch, "hello there\n/system be brief\nand now\n/bogus\n/reset\n/quit\nnever\n", base)
    assert res.code == 0, res.text
    said = [line for line in res.out.splitlines() if line.startswith("you> ")]
    assert said == [f"you> {m}" for m in ("hello there", "/system be brief", "and now", "/bogus", "/reset", "/quit")]
    assert res.out.count("base: ") == 2  # one reply per message, none to /commands or after /quit
    assert "system prompt: be brief (conversation cleared)" in res.err
    assert "unknown command /bogus" in res.err and "conversation cleared" in res.err
    timings = [line for line in res.err.splitlines() if line.startswith("base: ")]
    assert len(timings) == 2 and all(f"{TOKENS} tokens, first token after" in t for t in timings)


def test_end_of_input_ends_the_chat(cli, monkeypatch, models):
    res = chat_with(cli, monkeypatch, "hello\n", models[0])
    assert res.code == 0 and res.out.count("base: ") == 1, res.text


def test_two_models_answer_every_turn_in_order(cli, monkeypatch, models):
    base, other, _ = models
    res = chat_with(cli, monkeypatch, "hello\nagain\n", base, other)
    assert res.code == 0, res.text
    labels = [line.split(":")[0] for line in res.out.splitlines() if line.startswith(("base:", "other:"))]
    assert labels == ["base", "other", "base", "other"]


def test_one_shot_json_and_the_hook_edit_answers_as_the_written_checkpoint(cli, models, tmp_path):
    base, _, direction = models
    edited = tmp_path / "edited"
    assert cli("orthogonalize", base, "--direction", direction, "--out", edited).code == 0
    prompts = ["how do i bake bread?", "tell me a story"]
    args = [a for p in prompts for a in ("--prompt", p)]
    hooks = cli("chat", base, "--direction", direction, *args, "--max-new-tokens", TOKENS, "--json")
    written = cli("chat", base, edited, *args, "--max-new-tokens", TOKENS, "--json")
    assert hooks.code == written.code == 0, hooks.text + written.text
    by_hooks, by_checkpoint = json.loads(hooks.out), json.loads(written.out)
    assert [r["prompt"] for r in by_hooks] == prompts
    for h, w in zip(by_hooks, by_checkpoint, strict=True):
        (base_h, edit_h), (base_w, edit_w) = h["replies"], w["replies"]
        assert base_h["text"] == base_w["text"]
        assert edit_h["label"] == "ablate direction.safetensors (hooks)" and edit_w["label"] == "edited"
        assert edit_h["text"] == edit_w["text"]  # the hooks are the edit's in-memory twin
        assert edit_h["text"] != base_h["text"]
        for r in (base_h, edit_h):
            assert r["tokens"] == int(TOKENS) and r["first_token_s"] > 0 and r["first_token_cpu_s"] > 0


def test_a_variant_and_a_baked_addition_as_hooks(cli, models):
    base, _, direction = models
    res = cli("chat", base, "--direction", direction, "--weight", "0.5", "--prompt", "hi", "--max-new-tokens", "4")
    assert res.code == 0 and "attn 0.50, mlp 0.50, embedding 0.50 (hooks): " in res.out, res.text
    res = cli("chat", base, "--direction", direction, "--mode", "add", "--coeff", "-1", "--prompt", "hi")
    assert res.code == 0 and "add -1 x vector direction.safetensors (hooks): " in res.out, res.text


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["EDITED", "--direction", "D"], "give EDITED or --direction / --spec (a hook edit), not both"),
        (["--coeff", "2"], "--coeff describe the hook edit of --direction: give --direction"),
        (["--json"], "--json prints the replies to --prompt: give --prompt or --prompt-file"),
        (["--direction", "D", "--weight", "0.5", "--spec", "front.json"], "--spec already describes the edit"),
        (["--max-new-tokens", "0", "--prompt", "hi"], "--max-new-tokens must be at least 1"),
        (["--temperature", "-1", "--prompt", "hi"], "--temperature must be 0 (greedy) or more"),
    ],
)
def test_mistakes_are_one_line(extra, needle, cli, models):
    base, other, direction = models
    args = [str(other) if a == "EDITED" else str(direction) if a == "D" else a for a in extra]
    res = cli("chat", base, *args)
    assert res.code == 1 and needle in res.err and "Traceback" not in res.err, res.text


def test_the_conversation_is_multi_turn_and_streamed_replies_are_the_greedy_ones(models):
    base, _, _ = models
    chat = open_chat(base, max_new_tokens=int(TOKENS))
    pieces: list[str] = []
    first = chat.ask("hello", lambda i, p: pieces.append(p))[0]
    assert "".join(pieces).split() == first.text.split()  # streamed as generated
    speaker = chat.speakers[0]
    lm = load_model(base)
    alone = generate(lm.model, lm.tokenizer, [speaker.fmt.format("hello")], max_new_tokens=int(TOKENS))[0]
    assert first.text == alone.text  # the batch generator's greedy reply
    chat.ask("and then?")
    assert [t["role"] for t in speaker.turns] == ["user", "assistant", "user", "assistant"]
    assert speaker.turns[1]["content"] == first.text
    chat.set_system("be brief")
    assert speaker.turns == [] and chat.system == "be brief"
    assert "be brief" in speaker.fmt.format_turns([{"role": "user", "content": "x"}])
    chat.set_system(None)
    assert chat.system is None  # the template's own default again


def test_an_interrupted_turn_is_not_kept(models):
    base, other, _ = models
    chat = open_chat(base, other, max_new_tokens=4)

    def stop_at_the_second(i, piece):
        if i == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        chat.ask("hello", stop_at_the_second)
    assert all(not s.turns for s in chat.speakers)
