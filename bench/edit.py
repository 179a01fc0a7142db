"""Benchmark: streaming orthogonalization vs a plain copy of the same checkpoint files.

Builds a synthetic Llama-shaped bfloat16 checkpoint (default 4.1 GB in 1 GB shards), then prints side
by side: the time of a plain copy (`cp -r`) and of orthogonalize (the CLI, in a subprocess), each until
its output is on disk (median of --repeat runs, alternated), their ratio, and the orthogonalize
process's peak RSS against the target 2 x largest tensor + 0.5 GiB.
The same checkpoint is then written again in four times as many shards, to show that RSS does not grow
with the number of shards.

    python bench/edit.py [--layers 10] [--shard-gb 1.0] [--repeat 3] [--settle 5] [--workdir DIR] [--keep]
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

HIDDEN, INTER, VOCAB, HEADS, KV = 4096, 11008, 32000, 32, 8
GIB = 1 << 30


def layer_tensors(i: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{i}."
    return {
        p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
        p + "self_attn.k_proj.weight": (KV * 128, HIDDEN),
        p + "self_attn.v_proj.weight": (KV * 128, HIDDEN),
        p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        p + "mlp.gate_proj.weight": (INTER, HIDDEN),
        p + "mlp.up_proj.weight": (INTER, HIDDEN),
        p + "mlp.down_proj.weight": (HIDDEN, INTER),
        p + "input_layernorm.weight": (HIDDEN,),
        p + "post_attention_layernorm.weight": (HIDDEN,),
    }


def build_checkpoint(root: Path, layers: int, shard_bytes: int) -> tuple[int, int]:
    """Write the checkpoint shard by shard; returns (total bytes, largest tensor bytes)."""
    root.mkdir(parents=True, exist_ok=True)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        shapes.update(layer_tensors(i))
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
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
    weight_map = {}
    total = largest = 0
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (torch.randn(shapes[n], generator=g) * 0.02).to(torch.bfloat16) for n in names}
        save_file(tensors, str(root / fname), metadata={"format": "pt"})
        for n, t in tensors.items():
            weight_map[n] = fname
            total += t.numel() * 2
            largest = max(largest, t.numel() * 2)
        del tensors
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV,
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    }
    (root / "config.json").write_text(json.dumps(config, indent=2))
    return total, largest


def rss_of(cmd: list[str], settle: float) -> tuple[float, float]:
    """(seconds until the output is on disk, peak RSS of the command) for one run.

    Each run starts with no dirty pages (`sync` first) and its time includes its own `sync`, so neither
    side is charged for the other's write-back; a fresh interpreter makes the RSS this command's alone.
    Then `settle` seconds of rest: on a VM that hands freed memory back to the host (after about 2 s), a
    command started right after the previous output was deleted writes into still-mapped pages and runs
    up to 1.6x faster, so without the pause the order of the commands decides the ratio.
    """
    os.sync()
    time.sleep(settle)
    probe = (
        "import os, resource, subprocess, sys, time; t = time.perf_counter(); "
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); os.sync(); "
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)"
    )
    out = subprocess.run([sys.executable, "-c", probe, *cmd], check=True, capture_output=True, text=True)
    seconds, peak = out.stdout.split()
    return float(seconds), float(peak)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--shard-gb", type=float, default=1.0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/refusal-edit-bench"))
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each command (the median is shown)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds of rest before each timed run")
    args = ap.parse_args()
    exe = str(Path(sys.executable).with_name("refusal-edit"))
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    direction = work / "direction.safetensors"
    torch.manual_seed(1)
    v = torch.randn(HIDDEN)
    save_file({"direction": v / v.norm(), "mean_diff": v}, str(direction), metadata={"layer": "3"})

    rows = []
    for shard_gb in (args.shard_gb, args.shard_gb / 4):
        layers = args.layers
        src = work / f"llama-{layers}l-{shard_gb:g}gb"
        total, largest = build_checkpoint(src, layers, int(shard_gb * 1e9))
        shards = len(list(src.glob("*.safetensors")))
        copy_times, edit_times, edit_rss = [], [], 0.0
        for _ in range(args.repeat):  # alternate copy and edit so drifts in disk speed hit both
            copy_times.append(rss_of(["cp", "-r", str(src), str(work / "copy")], args.settle)[0])
            shutil.rmtree(work / "copy")
            seconds, rss = rss_of(
                [exe, "orthogonalize", str(src), "--direction", str(direction), "--out", str(work / "out")],
                args.settle,
            )
            edit_times.append(seconds)
            edit_rss = max(edit_rss, rss)
            shutil.rmtree(work / "out")
        copy_s, edit_s = sorted(copy_times)[len(copy_times) // 2], sorted(edit_times)[len(edit_times) // 2]
        target = 2 * largest + 0.5 * GIB
        rows.append((layers, shards, total, largest, copy_s, edit_s, edit_rss, target))
        if not args.keep:
            shutil.rmtree(src)

    print(
        f"{'layers':>6} {'shards':>6} {'size GB':>8} {'copy s':>7} {'edit s':>7} {'ratio':>6} "
        f"{'peak RSS GiB':>12} {'target GiB':>10}"
    )
    for layers, shards, total, _largest, copy_s, edit_s, rss, target in rows:
        print(
            f"{layers:>6} {shards:>6} {total / 1e9:>8.2f} {copy_s:>7.2f} {edit_s:>7.2f} {edit_s / copy_s:>6.2f} "
            f"{rss / GIB:>12.2f} {target / GIB:>10.2f}"
        )
    few, many = rows[0], rows[1]
    print(f"ratio (edit / copy): {few[5] / few[4]:.2f} and {many[5] / many[4]:.2f}  (target <= 1.5)")
    print(
        f"peak RSS: {few[6] / GIB:.2f} GiB with {few[1]} shards, {many[6] / GIB:.2f} GiB with {many[1]} shards "
        f"(target <= {few[7] / GIB:.2f} GiB, independent of the shard count)"
    )


if __name__ == "__main__":
    main()
