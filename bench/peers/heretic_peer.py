"""heretic-llm 1.4.0 as a peer in bench/frontier.py: its own venv, its inputs from our prompt sets, one driven run.

Layout under WORKDIR (default runs/peers):
    heretic-venv/          heretic-llm 1.4.0 + CPU torch 2.13.0 (+ pexpect for the driver)
    heretic-run/           its working directory: config.toml, prompts/*.txt, checkpoints/ (Optuna journal),
                           heretic.log (its console), heretic-run.json (the driver's summary)
    heretic/trial-<N>/     every point of its final Pareto front, exported merged (full safetensors checkpoint)

heretic's inputs are our built-in sets: the train split (240 + 240) for its refusal directions, the val split
(60 + 60) for its own refusal count and KL. Our judge uses the test split, which heretic never sees.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VERSION = "1.4.0"
REQUIREMENTS = ("torch==2.13.0", f"heretic-llm=={VERSION}", "pexpect")
SYSTEM_PROMPT = "You are a helpful assistant."  # heretic's default (kept: we run it as users do)

# CPU settings that make a run feasible on 2 cores (shared/notes/heretic-offline.md).
DEFAULTS = {"batch_size": 25, "max_response_length": 48, "n_startup_trials": 8, "seed": 1}


@dataclass
class HereticPoint:
    """One point of heretic's final front, exported merged: heretic's own numbers and its trial parameters."""

    trial: int
    path: str
    refusals: int
    n_bad_prompts: int
    base_refusals: int | None
    kl_divergence: float
    direction_index: float | None
    parameters: dict[str, Any] = field(default_factory=dict)
    reached_s: float | None = None  # from heretic's start until this trial had finished

    @property
    def id(self) -> str:
        return f"trial-{self.trial}"


@dataclass
class HereticRun:
    points: list[HereticPoint]
    trials: int
    search_wall_s: float
    total_wall_s: float
    peak_rss_mib: float
    peak_rss_search_mib: float | None
    settings: dict[str, Any]
    summary: Path
    cost: dict[str, Any] | None = None  # RUN/cost.json: a run's cost over its sessions (see `load_run`)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["summary"] = str(self.summary)
        return d


def ensure_venv(venv: Path) -> Path:
    """heretic's own venv (its dependencies clash with ours: transformers 5, peft, lm-eval); returns its python."""
    python = venv / "bin" / "python"
    check = f"import importlib.metadata as m, pexpect; assert m.version('heretic-llm') == {VERSION!r}"
    probe = [str(python), "-c", check]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *REQUIREMENTS], check=True)
    return python


def write_prompts(folder: Path) -> dict[str, dict[str, Any]]:
    """Our built-in sets as heretic's one-prompt-per-line files: train for its directions, val for its scores."""
    from refusal_edit.prompts import builtin

    folder.mkdir(parents=True, exist_ok=True)
    files = {"good": ("harmless", "train"), "bad": ("harmful", "train")}
    files |= {"good_eval": ("harmless", "val"), "bad_eval": ("harmful", "val")}
    out = {}
    for key, (kind, split) in files.items():
        ps = builtin(kind).split(split)
        if any("\n" in t or "\r" in t for t in ps.instructions):
            raise ValueError(f"builtin:{kind}@{split} has a multi-line prompt; heretic reads one prompt per line")
        path = folder / f"{kind}-{split}.txt"
        path.write_text("\n".join(ps.instructions) + "\n", encoding="utf-8")
        out[key] = {"path": str(path.resolve()), **ps.describe()}
    return out


def write_config(run: Path, model_dir: Path, trials: int, **overrides: Any) -> dict[str, Any]:
    """heretic's config.toml in `run` (it reads ./config.toml); returns the settings and prompt files used."""
    prompts = write_prompts(run / "prompts")
    settings = {**DEFAULTS, **overrides, "n_trials": trials}
    values = {k: json.dumps(v) for k, v in settings.items()}  # TOML basic strings and numbers read like JSON
    values |= {k: json.dumps(p["path"]) for k, p in prompts.items()}
    values["model"] = json.dumps(str(Path(model_dir).resolve()))
    (run / "config.toml").write_text((HERE / "heretic.toml").read_text().format(**values), encoding="utf-8")
    return {**settings, "model": str(model_dir), "system_prompt": SYSTEM_PROMPT, "prompts": prompts}


def _complete(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _reached(data: dict[str, Any], setup_s: float | None = None) -> dict[int, float]:
    """Seconds from heretic's start until each trial had finished: the search's wall time less the durations of
    the trials that ran after it (trials run one after another; the gaps between them are the sampler's).

    A run resumed across sessions pays its setup (load, directions, base scores) once per session; with
    `setup_s` (one session's setup) the time is that setup plus the durations of the trials up to this one,
    i.e. what one uninterrupted run would have taken.
    """
    done = [t for t in data["trials"] if t.get("seconds") is not None and t.get("trial") is not None]
    done = sorted((t for t in done if t.get("state", "COMPLETE") == "COMPLETE"), key=lambda t: t["trial"])
    if setup_s is not None:
        out, total = {}, setup_s
        for t in done:
            total += t["seconds"]
            out[t["trial"]] = round(total, 1)
        return out
    out, later = {}, 0.0
    for t in reversed(done):
        out[t["trial"]] = round(data["search_wall_s"] - later, 1)
        later += t["seconds"]
    return out


def load_run(run: Path) -> HereticRun | None:
    """A finished, fully exported run in `run` (None if there is none, or an export is missing)."""
    summary = run / "heretic-run.json"
    if not summary.is_file():
        return None
    data = json.loads(summary.read_text())
    cost_file = run / "cost.json"  # written when a run spans sessions: each session's cost and the sum
    cost = json.loads(cost_file.read_text()) if cost_file.is_file() else None
    reached = _reached(data, (cost or {}).get("setup_s"))
    points = []
    for p in data["front"]:
        if "path" not in p or not _complete(Path(p["path"])):
            return None
        points.append(
            HereticPoint(
                trial=p["trial"],
                path=p["path"],
                refusals=p["refusals"],
                n_bad_prompts=p["n_bad_prompts"],
                base_refusals=p.get("base_refusals"),
                kl_divergence=p["kl_divergence"],
                direction_index=p.get("direction_index"),
                parameters=p.get("parameters") or {},
                reached_s=reached.get(p["trial"]),
            )
        )
    settings = json.loads((run / "bench-settings.json").read_text()) if (run / "bench-settings.json").is_file() else {}
    return HereticRun(
        points=points,
        trials=len([t for t in data["trials"] if t["state"] == "COMPLETE"]),
        search_wall_s=data["search_wall_s"],
        total_wall_s=data["total_wall_s"],
        peak_rss_mib=data["peak_rss_mib"],
        peak_rss_search_mib=data.get("peak_rss_search_mib"),
        settings=settings,
        summary=summary,
        cost=cost,
    )


def run_heretic(
    model_dir: Path, workdir: Path, trials: int, reuse: bool = False, venv: Path | None = None, **overrides: Any
) -> HereticRun:
    """Run heretic on `model_dir` (a local HF directory) for `trials` trials and export its whole final front.

    With `reuse`, a finished run with every export present is returned as it is; a finished study whose
    exports are missing is exported again without new trials. Without `reuse`, an existing run is an error
    (remove WORKDIR/heretic-run to start over): half an hour of CPU is never thrown away silently.
    """
    run, exports = workdir / "heretic-run", workdir / "heretic"
    if reuse:
        done = load_run(run)
        if done is not None:
            if done.trials != trials:
                raise ValueError(f"{run} holds a {done.trials}-trial run, not {trials}: remove it or pass that count")
            return done
    elif (run / "checkpoints").exists():
        raise ValueError(f"{run} holds a heretic study: pass --reuse to use it, or remove the folder")
    python = ensure_venv(venv or workdir / "heretic-venv")
    run.mkdir(parents=True, exist_ok=True)
    settings = write_config(run, model_dir, trials, **overrides)
    (run / "bench-settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    t0 = time.time()
    subprocess.run(
        [str(python), str(HERE / "heretic_drive.py"), "--run", str(run), "--exports", str(exports)], check=True
    )
    print(f"heretic: driven run finished in {time.time() - t0:.0f} s", file=sys.stderr)
    done = load_run(run)
    if done is None:
        raise RuntimeError(f"heretic finished but its exports are incomplete (see {run / 'heretic.log'})")
    return done
