"""Benchmark: a model larger than the memory it may use goes through extract -> orthogonalize -> evaluate on
the CPU, with accelerate placing what does not fit on disk (`--device auto --max-memory cpu=1GiB`).

Builds (once, cached) a synthetic bfloat16 checkpoint - `--shape qwen2-1.5b` (Qwen2.5-1.5B's shape, 3.1 GB
in 6 shards, the default) or `--shape llama-2k` (issue #34's: 16 Llama layers of hidden 2048, an untied head,
2.7 GB in 4 shards) - with the demo's tokenizer and chat template and random weights written with
safetensors shard by shard, the model never instantiated. Then it runs, each in its own process:

1. extract, offloaded (`--device auto --max-memory cpu=1GiB`), once per `--dtype` (default `auto,float32`:
   the default path, where auto picks bfloat16 since float32 would not fit, and float32);
2. the same extracts fully in memory (`--device cpu`, each in the dtype its offloaded run used), for the
   throughput ratio and the selected candidate;
3. orthogonalize (streaming) with the first offloaded run's direction;
4. evaluate BASE against the edited checkpoint, both offloaded.

Each run's peak RSS comes from the kernel (`os.wait4`); each pass's (loading, activations, proxy scores,
bypass, ...) from /proc samples every 0.2 s, split into resident anonymous and file-backed memory, and
attributed to the passes the run's progress lines name. The budget is printed next to each figure.
Throughput: training-prompt tokens (chat-formatted, both sides) over the seconds of the candidate-means pass,
from each run's run.json. Run it alone on the machine:

    flock /tmp/heavy.lock .venv/bin/python bench/big.py [--shape llama-2k] [--cpu 1GiB] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from refusal_edit.loading.cache import cache_root

DEMO = "qwen2.5-coder-0.5b-instruct"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
GIB = 2**30
RSS_TARGET = 2.5 * GIB


@dataclass(frozen=True)
class Shape:
    """A decoder-only checkpoint's shape (the weights are random)."""

    model_type: str
    hidden: int
    inter: int
    layers: int
    heads: int
    kv: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool
    shard_bytes: int

    def dims(self, layers: int) -> dict[str, int]:
        return {
            "hidden": self.hidden,
            "intermediate": self.inter,
            "layers": layers,
            "heads": self.heads,
            "kv": self.kv,
            "vocab": self.vocab,
            "tied": int(self.tied),
        }

    def layer_shapes(self, i: int) -> dict[str, tuple[int, ...]]:
        p = f"model.layers.{i}."
        q, kv, h = self.heads * self.head_dim, self.kv * self.head_dim, self.hidden
        out: dict[str, tuple[int, ...]] = {}
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            out[f"{p}self_attn.{name}.weight"] = (rows, h)
            if self.qkv_bias:
                out[f"{p}self_attn.{name}.bias"] = (rows,)
        out |= {
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (self.inter, h),
            p + "mlp.up_proj.weight": (self.inter, h),
            p + "mlp.down_proj.weight": (h, self.inter),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
        return out


SHAPES = {
    # Qwen2.5-1.5B: 28 layers, 3.1 GB of bfloat16 in 6 shards, the head tied to the embeddings.
    "qwen2-1.5b": Shape("qwen2", 1536, 8960, 28, 12, 2, 128, 151936, True, True, 512 * 2**20),
    # TinyLlama's shape with Qwen's vocabulary and an untied head: 16 layers, 2.7 GB of bfloat16 in 4 shards
    # (the checkpoint of issue #34).
    "llama-2k": Shape("llama", 2048, 5632, 16, 32, 4, 64, 151936, False, False, 700 * 2**20),
}


def demo_dir() -> Path:
    found = sorted((cache_root() / "gguf").glob(f"{DEMO}-*"))
    if not found:
        sys.exit(f"the demo model is not converted yet: run `refusal-edit fetch {DEMO}` first")
    return found[0]


def build_checkpoint(root: Path, shape: Shape, layers: int) -> int:
    """Write the checkpoint shard by shard (one shard's tensors in memory at a time); returns its bytes."""
    marker = root / "bench_big.json"
    if marker.is_file() and json.loads(marker.read_text()).get("shape") == shape.dims(layers):
        return int(json.loads(marker.read_text())["bytes"])
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    demo = demo_dir()
    for name in TOKENIZER_FILES:
        if (demo / name).is_file():
            shutil.copy2(demo / name, root / name)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (shape.vocab, shape.hidden)}
    for i in range(layers):
        shapes.update(shape.layer_shapes(i))
    shapes["model.norm.weight"] = (shape.hidden,)
    if not shape.tied:
        shapes["lm_head.weight"] = (shape.vocab, shape.hidden)
    groups: list[list[str]] = [[]]
    size = 0
    for name, dims in shapes.items():
        nbytes = 2 * int(torch.tensor(dims).prod())
        if groups[-1] and size + nbytes > shape.shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for n in names:
            t = torch.empty(shapes[n], dtype=torch.bfloat16)
            if n.endswith("norm.weight"):
                t.fill_(1.0)
            else:
                t.normal_(0.0, 0.02, generator=g)
            tensors[n] = t
        save_file(tensors, str(root / fname), metadata={"format": "pt"})
        for n, t in tensors.items():
            weight_map[n] = fname
            total += t.numel() * 2
        del tensors
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    demo_config = json.loads((demo / "config.json").read_text())
    config = {
        "architectures": [{"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[shape.model_type]],
        "model_type": shape.model_type,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.inter,
        "num_hidden_layers": layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "hidden_act": "silu",
        "tie_word_embeddings": shape.tied,
        "bos_token_id": demo_config.get("bos_token_id"),
        "eos_token_id": demo_config.get("eos_token_id"),
        "pad_token_id": demo_config.get("pad_token_id"),
        "dtype": "bfloat16",
    }
    if shape.model_type == "qwen2":
        config |= {"use_sliding_window": False, "sliding_window": None}
    (root / "config.json").write_text(json.dumps(config, indent=2))
    marker.write_text(json.dumps({"shape": shape.dims(layers), "bytes": total}))
    return total


PROGRESS = re.compile(r"^(?P<phase>[^:]+?): (?:[\d.]+(?:/[\d.]+)?|\d+%) \((?P<elapsed>[\d.]+ s|\d+ min \d+ s)\)$")
SAMPLE_S = 0.2


def _seconds(text: str) -> float:
    if "min" in text:
        minutes, _, rest = text.partition(" min ")
        return 60 * float(minutes) + float(rest.removesuffix(" s"))
    return float(text.removesuffix(" s"))


def _status(pid: int) -> dict[str, int] | None:
    """VmRSS, RssAnon and RssFile of a process in bytes (None once it is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    keys = ("VmRSS", "RssAnon", "RssFile")
    found = {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in lines) if k in keys}
    return found if len(found) == len(keys) else None


def phase_peaks(samples: list[tuple[float, dict[str, int]]], spans: dict[str, list[float]]) -> dict[str, dict]:
    """Peak memory per phase. A phase runs from its first progress line's time less the elapsed time it states
    to its last line; samples before the first phase are `load and setup`, others outside every phase `other`."""
    ordered = sorted(spans.items(), key=lambda kv: kv[1][0])
    first = ordered[0][1][0] if ordered else float("inf")
    peaks: dict[str, dict] = {}
    for t, mem in samples:
        names = [n for n, (a, b) in ordered if a <= t <= b] or (["load and setup"] if t < first else ["other"])
        for name in names:
            p = peaks.setdefault(name, {"peak_rss": 0, "peak_anon": 0, "peak_file": 0})
            p["peak_rss"] = max(p["peak_rss"], mem["VmRSS"])
            p["peak_anon"] = max(p["peak_anon"], mem["RssAnon"])
            p["peak_file"] = max(p["peak_file"], mem["RssFile"])
    order = ["load and setup", *(n for n, _ in ordered), "other"]
    return {n: peaks[n] for n in order if n in peaks}


def measured(name: str, cmd: list[str], log: Path) -> dict:
    """Run `cmd` in its own process: wall and CPU seconds and peak RSS from the kernel's accounting of that child
    (`os.wait4`), and peak resident memory per pass, from /proc samples every 0.2 s attributed to the passes its
    progress lines name."""
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    samples: list[tuple[float, dict[str, int]]] = []
    spans: dict[str, list[float]] = {}
    with log.open("w") as fh, log.open() as reader:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "REFUSAL_EDIT_QUIET": ""})
        done = threading.Event()

        def sample() -> None:
            pending = ""
            while not done.is_set():
                now = time.perf_counter() - t0
                mem = _status(proc.pid)
                if mem is not None:
                    samples.append((now, mem))
                pending += reader.read()
                *lines, pending = re.split(r"[\r\n]", pending)
                for line in lines:
                    m = PROGRESS.match(line.strip())
                    if m:
                        span = spans.setdefault(m["phase"], [now - _seconds(m["elapsed"]), now])
                        span[1] = now
                done.wait(SAMPLE_S)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        thread.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{name} failed (exit {proc.returncode}); its output:\n{log.read_text()[-4000:]}")
    rss = usage.ru_maxrss * 1024  # KiB on Linux
    cpu = usage.ru_utime + usage.ru_stime  # unlike wall time, barely changed by other load on the machine
    print(f"    {seconds:.0f} s ({cpu:.0f} CPU s), peak RSS {rss / GIB:.2f} GiB", flush=True)
    passes = phase_peaks(samples, spans)
    for phase, p in passes.items():
        print(
            f"    {phase:<40} peak RSS {p['peak_rss'] / GIB:5.2f} GiB "
            f"(anonymous {p['peak_anon'] / GIB:.2f}, file-backed {p['peak_file'] / GIB:.2f})",
            flush=True,
        )
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss": rss, "passes": passes}


def train_tokens(ckpt: Path, run: dict, n_train: int) -> int:
    """Chat-formatted training-prompt tokens of an extract run (the prompts it used, re-derived and checked)."""
    from refusal_edit.loading.model import load_tokenizer
    from refusal_edit.prompts import builtin, chat_format

    tok = load_tokenizer(ckpt)
    fmt = chat_format(tok)
    total = 0
    for side in ("harmful", "harmless"):
        ps = builtin(side).split("train").sample(n_train)
        if ps.sha256 != run["prompts"][f"{side}_train"]["sha256"]:
            sys.exit(f"the {side} training prompts differ from the run's (sha256)")
        total += sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in fmt.format_all(ps.instructions))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=cache_root() / "bench-big")
    ap.add_argument("--cpu", default="1GiB", help="CPU memory for weights in the offloaded runs (--max-memory)")
    ap.add_argument("--eval-cpu", default="512MiB", help="per model in evaluate, which holds BASE and EDITED")
    ap.add_argument("--n-train", type=int, default=8)
    ap.add_argument("--n-val", type=int, default=4)
    ap.add_argument(
        "--selection",
        default="--top-k 2 --refusal-tokens I,As --kl-threshold 1e9 --induce-threshold -1e9",
        help="extract's other options, one string (issue #34's run: '--refusal-tokens I --no-filter')",
    )
    ap.add_argument("--batch-size", default="16")
    ap.add_argument("--n-test", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--skip-memory", action="store_true", help="skip the in-memory extracts (no ratio)")
    ap.add_argument("--skip-evaluate", action="store_true", help="skip orthogonalize and evaluate")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-1.5b", help="the synthetic checkpoint's shape")
    ap.add_argument("--layers", type=int, help="decoder layers (default: the shape's; 2: a quick smoke run)")
    ap.add_argument(
        "--dtype",
        default="auto,float32",
        help="load dtypes, comma-separated: one offloaded extract (and one in memory) each; orthogonalize and "
        "evaluate use the first (auto: bfloat16 offloaded, as float32 would not fit)",
    )
    ap.add_argument("--clean", action="store_true", help="delete both checkpoints at the end")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    exe = str(Path(sys.executable).with_name("refusal-edit"))
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[args.shape]
    layers = args.layers or shape.layers
    ckpt = work / f"{args.shape}-shape-{layers}-layers-bf16"
    print(f"building (or reusing) the synthetic checkpoint in {ckpt}", flush=True)
    size = build_checkpoint(ckpt, shape, layers)
    print(f"    {size / 1e9:.2f} GB bfloat16 ({size / GIB:.2f} GiB), {len(list(ckpt.glob('*.safetensors')))} shards")
    common = [
        *("--n-train", str(args.n_train), "--n-val", str(args.n_val), *args.selection.split()),
        *("--batch-size", args.batch_size, "--force"),
    ]
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    budget = f"cpu={args.cpu}"
    runs: dict[str, dict] = {}
    outs: dict[str, Path] = {}
    for dtype in dtypes:
        key, out = f"extract_offload_{dtype}", work / f"direction-offload-{dtype}"
        cmd = [exe, "extract", str(ckpt), "--out", str(out), "--device", "auto", "--max-memory", budget]
        runs[key] = measured(
            f"extract, offloaded, --dtype {dtype}", [*cmd, "--dtype", dtype, *common], work / f"{key}.log"
        )
        runs[key]["budget"] = budget
        outs[key] = out
    if not args.skip_memory:
        used = {json.loads((outs[f"extract_offload_{d}"] / "run.json").read_text())["dtype"] for d in dtypes}
        for dtype in sorted(used):  # what each offloaded run loaded in (auto: bfloat16)
            key, out = f"extract_memory_{dtype}", work / f"direction-memory-{dtype}"
            cmd = [exe, "extract", str(ckpt), "--out", str(out), "--device", "cpu", "--dtype", dtype, *common]
            runs[key] = measured(f"extract, in memory, {dtype}", cmd, work / f"{key}.log")
            runs[key]["budget"] = "none"
            outs[key] = out
    edited = work / "edited"
    if not args.skip_evaluate:
        runs["orthogonalize"] = measured(
            "orthogonalize",
            [
                exe,
                "orthogonalize",
                str(ckpt),
                "--direction",
                str(outs[f"extract_offload_{dtypes[0]}"]),
                "--out",
                str(edited),
                "--force",
            ],
            work / "orthogonalize.log",
        )
        runs["evaluate_offload"] = measured(
            "evaluate, both offloaded",
            [
                *(exe, "evaluate", str(ckpt), str(edited), "--device", "auto", "--max-memory", f"cpu={args.eval_cpu}"),
                *("--n-test", str(args.n_test), "--max-new-tokens", str(args.max_new_tokens), "--borderline", "none"),
                *("--batch-size", "auto", "--out", str(work / "eval"), "--force", "--dtype", dtypes[0]),
            ],
            work / "evaluate.log",
        )
        runs["evaluate_offload"]["budget"] = f"cpu={args.eval_cpu} per model"

    for key, out in outs.items():
        run = json.loads((out / "run.json").read_text())
        tokens = train_tokens(ckpt, run, args.n_train)
        runs[key].update(
            tokens=tokens,
            candidates_s=run["timings"]["candidates"],
            tokens_per_s=tokens / run["timings"]["candidates"],
            dtype=run["dtype"],
            placement=run.get("placement"),
            chosen=[run["chosen"]["layer"], run["chosen"]["position"]],
        )
    print()
    print(f"{'step':<26} {'dtype':<9} {'wall s':>7} {'peak RSS GiB':>12} {'budget':<22} {'tokens/s':>9}  chosen")
    for key, r in runs.items():
        tps = f"{r['tokens_per_s']:.1f}" if "tokens_per_s" in r else "-"
        chosen = f"layer {r['chosen'][0]}, position {r['chosen'][1]}" if "chosen" in r else ""
        print(
            f"{key:<26} {r.get('dtype', '-'):<9} {r['seconds']:>7.0f} {r['peak_rss'] / GIB:>12.2f} "
            f"{r.get('budget', '-'):<22} {tps:>9}  {chosen}"
        )
    print(
        f"\ncheckpoint {size / GIB:.2f} GiB; peak RSS per pass (GiB; budget {budget} for weights, target "
        f"{RSS_TARGET / GIB:.1f} GiB for the whole process):"
    )
    for key, r in runs.items():
        if key.startswith("extract_offload"):
            verdict = "under" if r["peak_rss"] < RSS_TARGET else "OVER"
            print(f"  {key} ({r['dtype']}): {r['peak_rss'] / GIB:.2f} ({verdict} the target); {r['placement']}")
            for phase, p in r["passes"].items():
                print(f"    {phase:<40} {p['peak_rss'] / GIB:5.2f} (anonymous {p['peak_anon'] / GIB:.2f})")
            mem = runs.get(f"extract_memory_{r['dtype']}")
            if mem is not None:
                print(
                    f"    vs in memory: candidate means {r['tokens_per_s']:.1f} vs {mem['tokens_per_s']:.1f} tokens/s "
                    f"(ratio {r['tokens_per_s'] / mem['tokens_per_s']:.2f}); whole extract {r['seconds']:.0f} s vs "
                    f"{mem['seconds']:.0f} s; in-memory peak RSS {mem['peak_rss'] / GIB:.2f}; same candidate: "
                    f"{r['chosen'] == mem['chosen']}"
                )
    if "evaluate_offload" in runs:
        report = json.loads((work / "eval" / "report.json").read_text())
        print(f"evaluate (both offloaded, {report['settings']['device']}): {json.dumps(report_summary(report))}")
    if args.json:
        args.json.write_text(json.dumps({"checkpoint_bytes": size, "runs": runs}, indent=1) + "\n")
    if args.clean:
        for folder in (ckpt, edited):
            shutil.rmtree(folder, ignore_errors=True)
        print(f"removed the synthetic and the edited checkpoint (logs and reports stay in {work})")


def report_summary(report: dict) -> dict:
    keep = ("refusal", "kl", "ce")
    flat = report.get("summary") or {}
    return {k: v for k, v in flat.items() if any(w in k for w in keep)} or {"keys": sorted(report)[:8]}


if __name__ == "__main__":
    main()
