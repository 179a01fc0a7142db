"""Benchmark: a model larger than the memory it may use goes through extract -> orthogonalize -> evaluate on
the CPU, with accelerate placing what does not fit on disk (`--device auto --max-memory cpu=1GiB`).

Builds (once, cached) a synthetic Qwen2-shaped bfloat16 checkpoint of ~3.1 GB - Qwen2.5-1.5B's shape, the
demo's tokenizer and chat template, random weights written with safetensors shard by shard, the model never
instantiated - then runs, each in its own process with its peak RSS measured (`os.wait4`):

1. extract, offloaded: `--device auto --max-memory cpu=1GiB` (dtype auto: bfloat16, since float32 would not fit);
2. extract, the same run fully in memory (`--device cpu --dtype bfloat16`), for the throughput ratio;
3. orthogonalize (streaming) with the offloaded run's direction;
4. evaluate BASE against the edited checkpoint, both offloaded.

Throughput: training-prompt tokens (chat-formatted, both sides) over the seconds of the candidate-means pass,
from each run's run.json. Few prompts, so the whole benchmark takes minutes. Run it alone on the machine:

    flock /tmp/heavy.lock .venv/bin/python bench/big.py [--cpu 1GiB] [--n-train 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from refusal_edit.loading.cache import cache_root

HIDDEN, INTER, LAYERS, HEADS, KV, HEAD_DIM, VOCAB = 1536, 8960, 28, 12, 2, 128, 151936  # Qwen2.5-1.5B
DEMO = "qwen2.5-coder-0.5b-instruct"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
GIB = 2**30
RSS_TARGET = 2.5 * GIB


def dims(layers: int) -> dict[str, int]:
    return {"hidden": HIDDEN, "intermediate": INTER, "layers": layers, "heads": HEADS, "kv": KV, "vocab": VOCAB}


def layer_shapes(i: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{i}."
    return {
        p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
        p + "self_attn.q_proj.bias": (HEADS * HEAD_DIM,),
        p + "self_attn.k_proj.weight": (KV * HEAD_DIM, HIDDEN),
        p + "self_attn.k_proj.bias": (KV * HEAD_DIM,),
        p + "self_attn.v_proj.weight": (KV * HEAD_DIM, HIDDEN),
        p + "self_attn.v_proj.bias": (KV * HEAD_DIM,),
        p + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
        p + "mlp.gate_proj.weight": (INTER, HIDDEN),
        p + "mlp.up_proj.weight": (INTER, HIDDEN),
        p + "mlp.down_proj.weight": (HIDDEN, INTER),
        p + "input_layernorm.weight": (HIDDEN,),
        p + "post_attention_layernorm.weight": (HIDDEN,),
    }


def demo_dir() -> Path:
    found = sorted((cache_root() / "gguf").glob(f"{DEMO}-*"))
    if not found:
        sys.exit(f"the demo model is not converted yet: run `refusal-edit fetch {DEMO}` first")
    return found[0]


def build_checkpoint(root: Path, layers: int = LAYERS, shard_bytes: int = 512 * 2**20) -> int:
    """Write the checkpoint shard by shard (one shard's tensors in memory at a time); returns its bytes."""
    marker = root / "bench_big.json"
    if marker.is_file() and json.loads(marker.read_text()).get("shape") == dims(layers):
        return int(json.loads(marker.read_text())["bytes"])
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    demo = demo_dir()
    for name in TOKENIZER_FILES:
        if (demo / name).is_file():
            shutil.copy2(demo / name, root / name)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        shapes.update(layer_shapes(i))
    shapes["model.norm.weight"] = (HIDDEN,)  # the head is tied to the embeddings, as in Qwen2.5-1.5B
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.tensor(shape).prod())
        if groups[-1] and size + nbytes > shard_bytes:
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
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV,
        "vocab_size": VOCAB,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "bos_token_id": demo_config.get("bos_token_id"),
        "eos_token_id": demo_config.get("eos_token_id"),
        "pad_token_id": demo_config.get("pad_token_id"),
        "dtype": "bfloat16",
    }
    (root / "config.json").write_text(json.dumps(config, indent=2))
    marker.write_text(json.dumps({"shape": dims(layers), "bytes": total}))
    return total


def measured(name: str, cmd: list[str], log: Path) -> dict[str, float]:
    """Run `cmd` in its own process; (wall seconds, peak RSS bytes) from the kernel's accounting of that child."""
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd)}", flush=True)
    t = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "REFUSAL_EDIT_QUIET": ""})
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"{name} failed (exit {proc.returncode}); its output:\n{log.read_text()[-4000:]}")
    rss = usage.ru_maxrss * 1024  # KiB on Linux
    cpu = usage.ru_utime + usage.ru_stime  # unlike wall time, barely changed by other load on the machine
    print(f"    {seconds:.0f} s ({cpu:.0f} CPU s), peak RSS {rss / GIB:.2f} GiB", flush=True)
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss": rss}


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
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--batch-size", default="16")
    ap.add_argument("--n-test", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--skip-memory", action="store_true", help="skip the in-memory extract (no ratio)")
    ap.add_argument("--layers", type=int, default=LAYERS, help="decoder layers (28: ~3.1 GB; 2: a quick smoke run)")
    ap.add_argument(
        "--dtype", default="auto", help="load dtype of every run (auto: bfloat16 offloaded, as float32 would not fit)"
    )
    ap.add_argument("--clean", action="store_true", help="delete both checkpoints at the end")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    exe = str(Path(sys.executable).with_name("refusal-edit"))
    work = args.workdir
    ckpt = work / f"qwen2-1.5b-shape-{args.layers}-layers-bf16"
    print(f"building (or reusing) the synthetic checkpoint in {ckpt}", flush=True)
    size = build_checkpoint(ckpt, args.layers)
    print(f"    {size / 1e9:.2f} GB bfloat16 ({size / GIB:.2f} GiB), {len(list(ckpt.glob('*.safetensors')))} shards")
    common = [
        *("--n-train", str(args.n_train), "--n-val", str(args.n_val), "--top-k", str(args.top_k)),
        *("--refusal-tokens", "I,As", "--kl-threshold", "1e9", "--induce-threshold", "-1e9"),
        *("--batch-size", args.batch_size, "--force"),
    ]
    dtype = ["--dtype", args.dtype]
    runs: dict[str, dict] = {}
    offload_out, memory_out = work / "direction-offload", work / "direction-memory"
    runs["extract_offload"] = measured(
        "extract, offloaded",
        [
            exe,
            "extract",
            str(ckpt),
            "--out",
            str(offload_out),
            *("--device", "auto", "--max-memory", f"cpu={args.cpu}"),
            *dtype,
            *common,
        ],
        work / "extract-offload.log",
    )
    if not args.skip_memory:
        same = json.loads((offload_out / "run.json").read_text())["dtype"]  # what auto chose offloaded
        runs["extract_memory"] = measured(
            "extract, in memory",
            [exe, "extract", str(ckpt), "--out", str(memory_out), "--device", "cpu", "--dtype", same, *common],
            work / "extract-memory.log",
        )
    edited = work / "edited"
    runs["orthogonalize"] = measured(
        "orthogonalize",
        [exe, "orthogonalize", str(ckpt), "--direction", str(offload_out), "--out", str(edited), "--force"],
        work / "orthogonalize.log",
    )
    runs["evaluate_offload"] = measured(
        "evaluate, both offloaded",
        [
            *(exe, "evaluate", str(ckpt), str(edited), "--device", "auto", "--max-memory", f"cpu={args.eval_cpu}"),
            *("--n-test", str(args.n_test), "--max-new-tokens", str(args.max_new_tokens), "--borderline", "none"),
            *("--batch-size", "auto", "--out", str(work / "eval"), "--force", *dtype),
        ],
        work / "evaluate.log",
    )

    for key, out in (("extract_offload", offload_out), ("extract_memory", memory_out)):
        if key not in runs:
            continue
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
    for line in (work / "extract-offload.log").read_text().splitlines():
        if line.startswith(("note: dtype auto", "placed by accelerate")):
            print(f"    {line}")
    report = json.loads((work / "eval" / "report.json").read_text())
    print()
    print(f"{'step':<20} {'wall s':>7} {'peak RSS GiB':>12} {'tokens/s':>9}  notes")
    for key, r in runs.items():
        tps = f"{r['tokens_per_s']:.1f}" if "tokens_per_s" in r else "-"
        note = r.get("placement") or ""
        print(f"{key:<20} {r['seconds']:>7.0f} {r['peak_rss'] / GIB:>12.2f} {tps:>9}  {note}")
    off = runs["extract_offload"]
    verdict = "under" if off["peak_rss"] < RSS_TARGET else "OVER"
    print(
        f"\ncheckpoint {size / GIB:.2f} GiB; offloaded extract peak RSS {off['peak_rss'] / GIB:.2f} GiB ({verdict} the "
        f"{RSS_TARGET / GIB:.1f} GiB target)"
    )
    if "extract_memory" in runs:
        mem = runs["extract_memory"]
        print(
            f"throughput (candidate means): offloaded {off['tokens_per_s']:.1f} tokens/s, in memory "
            f"{mem['tokens_per_s']:.1f} tokens/s: ratio {off['tokens_per_s'] / mem['tokens_per_s']:.2f}; "
            f"whole extract {off['seconds']:.0f} s vs {mem['seconds']:.0f} s "
            f"(speed ratio {mem['seconds'] / off['seconds']:.2f}); same candidate: {off['chosen'] == mem['chosen']}"
        )
    print(f"evaluate (both offloaded, {report['settings']['device']}): {json.dumps(report_summary(report))}")
    if args.json:
        args.json.write_text(json.dumps({"checkpoint_bytes": size, "runs": runs}, indent=1) + "\n")
    if args.clean:
        for folder in (ckpt, edited):
            shutil.rmtree(folder)
        print(f"removed the synthetic and the edited checkpoint (logs and reports stay in {work})")


def report_summary(report: dict) -> dict:
    keep = ("refusal", "kl", "ce")
    flat = report.get("summary") or {}
    return {k: v for k, v in flat.items() if any(w in k for w in keep)} or {"keys": sorted(report)[:8]}


if __name__ == "__main__":
    main()
