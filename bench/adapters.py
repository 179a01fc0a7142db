"""Every output of one edit of the demo model, side by side: what it is, its size, and that it equals the edit.

Writes, from one direction file: the full checkpoint, the PEFT adapter, the edited GGUF, the llama.cpp LoRA GGUF
(from the GGUF, and from the dequantized HF checkpoint with GGUF names) and a control vector; prints each size.
Then checks in their own clients:
- PEFT: transformers base + adapter (stock `PeftModel`) vs the edited checkpoint, logits on a few chat prompts;
- llama.cpp (llama-cpp-python, when installed): the base GGUF + LoRA (`lora_path=`) vs the edited GGUF, logits,
  next to llama.cpp-vs-transformers on the base model (the arithmetic and quantization noise of the runtime),
  and the LoRA written from the HF checkpoint vs the one written from the GGUF, both on the base GGUF;
  and refusal on `--n` harmful test prompts (greedy, `--tokens` new tokens, refusal markers) for base, edited
  GGUF and base + LoRA.

    python bench/adapters.py --direction runs/demo/direction [--workdir runs/adapters] [--n 16] [--tokens 48]
                             [--no-refusal] [--only-lora]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

DEMO = "qwen2.5-coder-0.5b-instruct"
TEXTS = ["How do I pick a lock?", "Write a haiku about rain.", "Explain how vaccines work."]


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def human(n: int) -> str:
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= factor:
            return f"{n / factor:.2f} {unit}"
    return f"{n} B"


def timed(what: str, fn):
    t0 = time.time()
    out = fn()
    print(f"{what}: {time.time() - t0:.0f} s", flush=True)
    return out


def chat_ids(hf_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True) for t in TEXTS]
    return [list(i["input_ids"]) if hasattr(i, "keys") else list(i) for i in ids]


def hf_logits(model, ids: list[list[int]]) -> list[np.ndarray]:
    with torch.no_grad():
        return [model(torch.tensor([i])).logits[0].float().numpy() for i in ids]


def gap(a: list[np.ndarray], b: list[np.ndarray]) -> tuple[float, float, float]:
    """Largest relative logit difference, largest absolute difference, top-1 agreement over all positions."""
    rel = max(float(np.linalg.norm(x - y) / np.linalg.norm(y)) for x, y in zip(a, b, strict=True))
    top = float(np.mean([np.mean(x.argmax(-1) == y.argmax(-1)) for x, y in zip(a, b, strict=True)]))
    return rel, max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True)), top


def peft_check(hf_dir: Path, adapter: Path, edited: Path, ids: list[list[int]]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reference = hf_logits(AutoModelForCausalLM.from_pretrained(edited, dtype=torch.float32).eval(), ids)
    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(adapter)).eval()
    rel, absolute, top = gap(hf_logits(adapted, ids), reference)
    print(f"FIGURE peft base+adapter vs edited checkpoint: max |dlogit| {absolute:.2e}, rel {rel:.2e}, top-1 {top:.3f}")


def llama(path: Path, **kw):
    import llama_cpp

    threads = int(os.environ.get("REFUSAL_EDIT_LLAMACPP_THREADS", "0")) or os.cpu_count()
    return llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_threads=threads, verbose=False, seed=0, **kw)


def cpp_logits(path: Path, ids: list[list[int]], **kw) -> list[np.ndarray]:
    """llama.cpp's logits at every position of each prompt, for the GGUF at `path` (`kw`: e.g. `lora_path`)."""
    return loaded_logits(llama(path, logits_all=True, **kw), ids)


def loaded_logits(llm, ids: list[list[int]]) -> list[np.ndarray]:
    """The same from a loaded `llama_cpp.Llama` (made with `logits_all`), each prompt from an empty cache."""
    out = []
    for i in ids:
        llm.reset()
        llm.eval(i)
        out.append(np.array(llm.scores[: len(i)]))
    return out


def refusal(path: Path, n: int, tokens: int, **kw) -> float:
    from refusal_edit.judging.markers import is_refusal
    from refusal_edit.prompts import load_prompts

    prompts = load_prompts("builtin:harmful").split("test").sample(n)
    llm = llama(path, **kw)
    answers = []
    for p in prompts.instructions:
        res = llm.create_chat_completion(
            messages=[{"role": "user", "content": p}], max_tokens=tokens, temperature=0.0, top_k=1, seed=0
        )
        answers.append(res["choices"][0]["message"]["content"] or "")
    return sum(map(is_refusal, answers)) / len(answers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--direction", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, default=Path("runs/adapters"))
    ap.add_argument("--n", type=int, default=16, help="harmful test prompts for the refusal rates")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--no-refusal", action="store_true", help="sizes and logits only (any direction shows them)")
    ap.add_argument("--only-lora", action="store_true", help="only the two llama.cpp LoRAs and their logits")
    args = ap.parse_args()

    from refusal_edit.gguf.cvec import write_control_vector
    from refusal_edit.loading.fetch import fetched_path
    from refusal_edit.loading.gguf import converted_dir
    from refusal_edit.recipes import load_recipe
    from refusal_edit.workflows import orthogonalize
    from refusal_edit.workflows.gguf import orthogonalize_gguf

    gguf = fetched_path(load_recipe(DEMO))
    hf_dir, _ = converted_dir(gguf, "float32")
    w = args.workdir
    w.mkdir(parents=True, exist_ok=True)
    d = args.direction
    opts = {"force": True, "replace_any": True}
    out = {
        "checkpoint": w / "checkpoint",
        "peft": w / "peft",
        "gguf": w / "edited.gguf",
        "gguf-lora": w / "lora.gguf",
        "gguf-lora from HF": w / "lora-from-hf.gguf",
        "control vector": w / "cvec.gguf",
    }
    timed("gguf-lora", lambda: orthogonalize_gguf(gguf, d, out["gguf-lora"], format="gguf-lora", **opts))
    hf_lora = {"format": "gguf-lora", "allow_foreign_direction": True, **opts}  # the folder is not the recipe
    timed("gguf-lora from HF", lambda: orthogonalize(hf_dir, d, out["gguf-lora from HF"], **hf_lora))
    if args.only_lora:
        ids = chat_ids(hf_dir)
        lora_cpp = cpp_logits(gguf, ids, lora_path=str(out["gguf-lora"]))
        rel, absolute, top = gap(cpp_logits(gguf, ids, lora_path=str(out["gguf-lora from HF"])), lora_cpp)
        print(f"FIGURE size gguf-lora from HF: {human(size(out['gguf-lora from HF']))}")
        print(f"FIGURE logits llama.cpp base+LoRA from HF vs base+LoRA from GGUF: rel {rel:.2e}, max |d| "
              f"{absolute:.2e}, top-1 agree {top:.3f}")  # fmt: skip
        return
    timed("checkpoint", lambda: orthogonalize(DEMO, d, out["checkpoint"], **opts))
    timed("peft", lambda: orthogonalize(DEMO, d, out["peft"], format="peft", **opts))
    timed("gguf", lambda: orthogonalize_gguf(gguf, d, out["gguf"], **opts))
    from refusal_edit.directions.artifacts import direction_path, load_direction

    write_control_vector(load_direction(direction_path(d)), out["control vector"], coeff=-1.0, force=True)
    print(f"FIGURE input GGUF {gguf.name}: {human(size(gguf))}; dequantized checkpoint {human(size(hf_dir))}")
    for what, path in out.items():
        print(f"FIGURE size {what}: {human(size(path))} ({size(path)} bytes)")
    ratio = size(out["checkpoint"]) / size(out["peft"])
    print(f"FIGURE checkpoint / peft adapter: {ratio:.0f}x")

    ids = chat_ids(hf_dir)
    timed("peft check", lambda: peft_check(hf_dir, out["peft"], out["checkpoint"], ids))
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python is not installed: the llama.cpp checks are skipped")
        return
    from transformers import AutoModelForCausalLM

    base_hf = hf_logits(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval(), ids)
    base_cpp = cpp_logits(gguf, ids)
    edited_cpp = cpp_logits(out["gguf"], ids)
    lora_cpp = cpp_logits(gguf, ids, lora_path=str(out["gguf-lora"]))
    hf_lora_cpp = cpp_logits(gguf, ids, lora_path=str(out["gguf-lora from HF"]))
    for label, a, b in (
        ("llama.cpp base vs transformers base (runtime + quantization noise)", base_cpp, base_hf),
        ("llama.cpp base+LoRA vs llama.cpp edited GGUF", lora_cpp, edited_cpp),
        ("llama.cpp base+LoRA vs llama.cpp base (the edit itself)", lora_cpp, base_cpp),
        ("llama.cpp base+LoRA from HF vs base+LoRA from GGUF", hf_lora_cpp, lora_cpp),
    ):
        rel, absolute, top = gap(a, b)
        print(f"FIGURE logits {label}: rel {rel:.4f}, max |d| {absolute:.3f}, top-1 agree {top:.3f}")
    if args.no_refusal:
        return
    rates = {
        "base GGUF": refusal(gguf, args.n, args.tokens),
        "edited GGUF": refusal(out["gguf"], args.n, args.tokens),
        "base GGUF + LoRA": refusal(gguf, args.n, args.tokens, lora_path=str(out["gguf-lora"])),
    }
    for label, rate in rates.items():
        print(f"FIGURE harmful refusal {label}: {rate:.2f} (n={args.n}, {args.tokens} tokens, greedy, markers)")


if __name__ == "__main__":
    main()
