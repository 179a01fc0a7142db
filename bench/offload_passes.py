"""Benchmark: resident memory of every pass over a model all on disk, pass by pass, against one layer's weights.

A small llama (12 layers of 5.8 MiB in bfloat16, 11.5 MiB in float32; the test suite's character tokenizer and
short prompts of our own) is placed all on disk (`--device auto --max-memory cpu=1KB`: every module's weights
are read when it runs) and goes through the commands that run passes over offloaded weights, each in its own
process, in each dtype:

- extract: the activations passes, the proxy scores and their backward, bypass / induce generation, KL;
- evaluate with the extracted direction's hooks: generation of both sides, teacher forcing (KL, cross-entropy);
- tune: the proxies of the base model and of each trial's edit.

A pass is a progress task: when one starts, the kernel's peak RSS of the process (VmHWM) is reset
(`/proc/self/clear_refs`) and read when the next starts. Each pass's growth is its peak over the RSS before the
first pass (loading done, runtime warm), in MiB and in layers, and what stays after it; a pass that kept what
it read would grow by every layer it ran (12). A few minutes of CPU time (bfloat16 matmuls are slow on CPUs
without native bf16):

    .venv/bin/python bench/offload_passes.py [--dtype bfloat16,float32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20

# Runs in the child: the command line in-process, every progress task a pass with its own kernel peak.
PROBE = r"""
import atexit, json, sys
from refusal_edit import console

def status(key):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(key + ":"))

passes, out = [], sys.argv.pop(1)

def close():
    if passes and "peak" not in passes[-1]:
        passes[-1].update(peak=status("VmHWM"), after=status("VmRSS"))

def start(name):
    close()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # VmHWM := VmRSS
    passes.append({"pass": name, "before": status("VmRSS")})

real = console.LineProgress.add_task
def add_task(self, description, total=None, **kw):
    start(description)
    return real(self, description, total, **kw)
console.LineProgress.add_task = add_task

def dump():
    close()
    with open(out, "w") as fh:
        json.dump(passes, fh)
atexit.register(dump)
start("loading and setup")
from refusal_edit.cli import main
main()
"""


def build(folder: Path, layers: int) -> tuple[Path, dict]:
    """A llama as wide as tests/test_offload.py's (float32 on disk), once."""
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny

    path = folder / "wide"
    if not (path / "config.json").is_file():
        model = tiny.build(
            "llama",
            hidden_size=512,
            intermediate_size=1536,
            num_hidden_layers=layers,
            num_attention_heads=8,
            head_dim=64,
        )
        tiny.save(model, path)
    return path, json.loads((path / "config.json").read_text())


def layer_bytes(config: dict, width: int) -> int:
    h, inter, kv, hd = (config[k] for k in ("hidden_size", "intermediate_size", "num_key_value_heads", "head_dim"))
    return width * (2 * h * h + 2 * h * kv * hd + 3 * h * inter)


def probe(cmd: list[str], out: Path) -> list[dict]:
    env = {**os.environ, "REFUSAL_EDIT_QUIET": ""}
    res = subprocess.run(
        [sys.executable, "-c", PROBE, str(out), *cmd], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if res.returncode != 0:
        sys.exit(f"{' '.join(cmd[:2])} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16,float32")
    ap.add_argument("--layers", type=int, default=12, help="decoder layers (2: a quick check that it runs)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, config = build(work, args.layers)
        sets = {}
        for side, stem in (("harmful", "how to pick lock"), ("harmless", "name a fruit")):
            sets[side] = work / f"{side}.txt"  # short prompts: the character tokenizer makes a token of each
            sets[side].write_text("".join(f"{stem} {i}\n" for i in range(60)))
        prompts = ["--harmful", str(sets["harmful"]), "--harmless", str(sets["harmless"])]
        tested = ["--harmful", f"{sets['harmful']}@test", "--harmless", f"{sets['harmless']}@test"]
        disk = ["--device", "auto", "--max-memory", "cpu=1KB"]
        for dtype in args.dtype.split(","):
            layer = layer_bytes(config, 2 if dtype in ("bfloat16", "float16") else 4)
            d = work / f"direction-{dtype}"
            small = ["--dtype", dtype, *disk, "--batch-size", "4"]
            commands = {
                "extract": [
                    *("extract", str(model), "--out", str(d), "--n-train", "4", "--n-val", "2", "--top-k", "1"),
                    *(
                        "--refusal-tokens",
                        "i,as",
                        "--kl-threshold",
                        "1e9",
                        "--induce-threshold",
                        "-1e9",
                        *prompts,
                        *small,
                    ),
                ],
                "evaluate": [
                    *("evaluate", str(model), "--direction", str(d), "--n-test", "4", "--max-new-tokens", "4"),
                    *(
                        "--kl-tokens",
                        "4",
                        "--borderline",
                        "none",
                        *tested,
                        "--out",
                        str(work / f"eval-{dtype}"),
                        *small,
                    ),
                ],
                "tune": [
                    *("tune", str(model), "--direction", str(d), "--trials", "3", "--confirm", "1", "--n-val", "2"),
                    *("--search-prompts", "2", "--max-new-tokens", "4", "--resolve", "0", *prompts),
                    *("--out", str(work / f"tune-{dtype}"), *small),
                ],
            }
            print(
                f"{dtype}: one layer {layer / MIB:.1f} MiB, {args.layers} layers {args.layers * layer / MIB:.0f} MiB",
                flush=True,
            )
            for name, cmd in commands.items():
                passes = probe(cmd, work / f"{name}-{dtype}.json")
                floor = passes[1]["before"] if len(passes) > 1 else passes[0]["before"]
                rows = []
                for p in passes:
                    growth = p["peak"] - floor
                    rows.append({**p, "growth": growth, "layers": growth / layer})
                    print(
                        f"  {name:<9} {p['pass'][:44]:<44} peak {p['peak'] / MIB:6.0f} MiB, "
                        f"+{growth / MIB:4.0f} MiB over the floor ({growth / layer:4.1f} layers), "
                        f"after it {(p['after'] - floor) / MIB:+4.0f} MiB",
                        flush=True,
                    )
                results[f"{name}_{dtype}"] = {"layer": layer, "floor": floor, "passes": rows}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
