"""Drive heretic-llm 1.4.0 headlessly and export every point of its final Pareto front as a merged checkpoint.

Runs with heretic's own venv (it needs `pexpect` and `optuna`, both installed there), not with ours:

    HERETIC_VENV/bin/python bench/peers/heretic_drive.py --run RUN_DIR --exports OUT_DIR [--heretic BIN]

RUN_DIR holds heretic's `config.toml` (bench/peers/heretic.py writes it); heretic runs with RUN_DIR as its working
directory, so its study journal lands in RUN_DIR/checkpoints/. Each front point is saved to OUT_DIR/trial-<N>/.
The summary goes to RUN_DIR/heretic-run.json and heretic's full console output to RUN_DIR/heretic.log.

Why a pty driver: 1.4.0 has no headless mode; after the search it asks which trial to use and what to do with it.
heretic reads its menus through plain numbered `input()` prompts when it believes it runs in a notebook (its
`is_notebook()` checks the COLAB_GPU variable, and nothing else in its venv reads that variable), which a pty drives
reliably; the questionary arrow-key menus it shows in a terminal would need screen scraping. Nothing else changes:
same settings, same search, same export code.

If RUN_DIR already holds a finished study, heretic offers to show its results: the driver accepts, so the
front is exported again without re-running the trials (heretic recomputes its directions first).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import sys
import time
from pathlib import Path

import pexpect

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\r")
CHOICE = re.compile(r"^\[(\d+)\] (.*)$")
TRIAL = re.compile(r"\[Trial\s+(\d+)\] Refusals:\s*(\d+)/(\d+), KL divergence: ([0-9.]+)")
ENTER = "Enter number: "


def _clean(text: str) -> str:
    return ANSI.sub("", text)


def _choices(before: str) -> list[tuple[int, str]]:
    """The numbered choices printed just before an `Enter number:` prompt (the last block of `[i] ...` lines)."""
    found: list[tuple[int, str]] = []
    for line in _clean(before).splitlines():
        m = CHOICE.match(line.strip())
        if m:
            if int(m.group(1)) == 1:
                found = []
            found.append((int(m.group(1)), m.group(2)))
    return found


def _pick(choices: list[tuple[int, str]], starts: str) -> int:
    for i, title in choices:
        if title.startswith(starts):
            return i
    raise RuntimeError(f"heretic offered no choice starting with {starts!r}: {choices}")


def _vm_hwm_kib(pid: int) -> int | None:
    """Peak resident set size so far of a live process (VmHWM), in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _journal(run: Path) -> list[dict]:
    """Every trial of heretic's study (from its Optuna journal): parameters, heretic's numbers, timestamps."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    files = sorted((run / "checkpoints").glob("*.jsonl"))
    if len(files) != 1:
        raise RuntimeError(f"expected one study journal in {run / 'checkpoints'}, found {len(files)}")
    path = str(files[0])
    storage = JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
    study = optuna.load_study(study_name="heretic", storage=storage)
    rows = []
    for t in study.trials:
        a = t.user_attrs
        rows.append(
            {
                "trial": a.get("index"),
                "state": t.state.name,
                "refusals": a.get("refusals"),
                "n_bad_prompts": a.get("n_bad_prompts"),
                "base_refusals": a.get("base_refusals"),
                "kl_divergence": a.get("kl_divergence"),
                "direction_index": a.get("direction_index"),
                "parameters": a.get("parameters"),
                "sampled": t.params,
                "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
                if t.datetime_complete and t.datetime_start
                else None,
            }
        )
    return rows


def drive(run: Path, exports: Path, heretic: str, timeout: float) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", COLAB_GPU="1", PYTHONUNBUFFERED="1")
    env.setdefault("COLUMNS", "400")
    log = (run / "heretic.log").open("w", encoding="utf-8")
    t0 = time.time()
    # A job started in the background (`cmd &`) inherits SIGINT ignored, and Python then never raises
    # KeyboardInterrupt: restore it so `kill -INT` stops heretic's study gracefully (it then offers its front).
    child = pexpect.spawn(
        heretic,
        cwd=str(run),
        env=env,
        encoding="utf-8",
        codec_errors="replace",
        timeout=timeout,
        dimensions=(60, 400),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    child.logfile_read = log
    front: list[dict] = []
    pending: list[dict] = []
    current: dict | None = None
    t_menu = peak_search_kib = None
    resumed = False
    while True:
        i = child.expect(
            [
                r"How would you like to proceed\?",
                r"Which trial do you want to use\?",
                r"What do you want to do with the decensored model\?",
                r"Path to the folder:+ ",
                pexpect.EOF,
            ]
        )
        if i == 0:  # a finished (or interrupted) study exists in RUN/checkpoints: show / continue it
            child.expect_exact(ENTER)
            choices = _choices(child.before)
            resumed = True
            child.sendline(str(choices[0][0]))
        elif i == 1:
            child.expect_exact(ENTER)
            choices = _choices(child.before)
            if t_menu is None:  # the search is over: heretic's final front, in its menu order
                t_menu = time.time()
                peak_search_kib = _vm_hwm_kib(child.pid)
                for n, title in choices:
                    m = TRIAL.search(title)
                    if m:
                        front.append(
                            {
                                "choice": n,
                                "trial": int(m.group(1)),
                                "refusals": int(m.group(2)),
                                "n_bad_prompts": int(m.group(3)),
                                "kl_divergence_shown": float(m.group(4)),
                            }
                        )
                if not front:
                    raise RuntimeError(f"no Pareto front in heretic's menu: {choices}")
                pending = list(front)
            if pending:
                current = pending.pop(0)
                child.sendline(str(current["choice"]))
            else:
                child.sendline(str(_pick(choices, "Exit program")))
        elif i == 2:
            child.expect_exact(ENTER)
            choices = _choices(child.before)
            if current is not None and "path" not in current:
                child.sendline(str(_pick(choices, "Save the model to a local folder")))
            else:
                child.sendline(str(_pick(choices, "Return to the trial selection menu")))
        elif i == 3:
            assert current is not None
            target = exports / f"trial-{current['trial']}"
            t_save = time.time()
            child.sendline(str(target.resolve()))
            child.expect(r"Model saved to|Error: ")
            if "Error" in child.after:
                child.expect_exact(ENTER)
                raise RuntimeError(f"heretic failed to save trial {current['trial']}: {_clean(child.before)[-2000:]}")
            current["path"] = str(target)
            current["save_s"] = round(time.time() - t_save, 1)
        else:
            break
    child.close()
    log.close()
    t_end = time.time()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # heretic is the driver's only child
    peak_kib = usage.ru_maxrss
    if child.exitstatus not in (0, None) or t_menu is None:
        raise RuntimeError(f"heretic exited with status {child.exitstatus} (see {run / 'heretic.log'})")
    trials = _journal(run)
    by_index = {t["trial"]: t for t in trials}
    for point in front:
        point.update({k: v for k, v in by_index[point["trial"]].items() if k not in ("trial", "state")})
    return {
        "tool": "heretic-llm",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t0)),
        "resumed": resumed,
        "config": (run / "config.toml").read_text(encoding="utf-8"),
        "front": front,
        "trials": trials,
        "search_wall_s": round(t_menu - t0, 1),
        "export_wall_s": round(t_end - t_menu, 1),
        "total_wall_s": round(t_end - t0, 1),
        "peak_rss_search_mib": round(peak_search_kib / 1024, 1) if peak_search_kib else None,
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),  # immune to pauses, not to a busy machine's slowdown
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="heretic's working directory (holds config.toml)")
    ap.add_argument("--exports", type=Path, required=True, help="where trial-<N>/ checkpoints are saved")
    ap.add_argument("--heretic", default=str(Path(sys.executable).with_name("heretic")), help="the heretic script")
    ap.add_argument("--timeout", type=float, default=4 * 3600, help="seconds to wait for any one prompt")
    args = ap.parse_args()
    if not (args.run / "config.toml").is_file():
        sys.exit(f"no config.toml in {args.run}")
    args.exports.mkdir(parents=True, exist_ok=True)
    out = args.run / "heretic-run.json"
    previous = json.loads(out.read_text()) if out.is_file() else None
    result = drive(args.run, args.exports, args.heretic, args.timeout)
    if result["resumed"] and previous is not None:
        # A re-export of a finished study: its cost is the first run's; this run's timings are kept apart.
        keys = ("search_wall_s", "export_wall_s", "total_wall_s", "peak_rss_search_mib", "peak_rss_mib", "cpu_s")
        result["reexport"] = {k: result[k] for k in keys}
        result.update({k: previous.get(k) for k in keys})
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out)
    print(json.dumps({k: v for k, v in result.items() if k not in ("trials", "config")}, indent=2))


if __name__ == "__main__":
    main()
