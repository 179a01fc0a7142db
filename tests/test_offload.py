"""Models spread by accelerate (`device` auto): a tiny model forced partly onto the CPU and partly onto disk by
`max_memory` gives what the in-memory model gives - candidate means, the selected candidate, evaluation
numbers, hooked logits, proxy gradients - and the sizing rules (dtype, batch size, disk room) say what they did.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
from pathlib import Path

import pytest
import tiny
import torch

from refusal_edit.directions.artifacts import load_direction, save_direction
from refusal_edit.directions.extract import ExtractSettings
from refusal_edit.directions.select import SelectionSettings
from refusal_edit.edits.spec import DirectionBank, EditSpec, full_ablation
from refusal_edit.errors import RefusalEditError
from refusal_edit.evaluation.comparison import EvalSettings
from refusal_edit.forward import BATCH_LIMIT, PromptBatch, parse_batch_size, resolve_batch_size
from refusal_edit.interventions import RowGroups, ablation, addition, edit_hooks_by_row
from refusal_edit.loading import load_model
from refusal_edit.loading import placement as placement_module
from refusal_edit.loading.placement import parse_max_memory
from refusal_edit.offload import dispatched, input_device, layer_devices, reloaded_in_backward
from refusal_edit.prompts import builtin, chat_format
from refusal_edit.workflows import evaluate, run_extract

SPLIT = "cpu=100KB"  # tiny qwen2 in float32: embeddings and layer 0 on the CPU, layers 1-2 and the head on disk
ALL_DISK = "cpu=1KB"  # nothing fits: every module is read from disk when it runs


def short(kind: str):
    ps = builtin(kind)
    ps.instructions = [t[:40] for t in ps.instructions]  # the tiny models have 128 positions
    return ps


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    from refusal_edit.workflows import orthogonalize

    root = tmp_path_factory.mktemp("offload")
    base = tiny.save(tiny.build("qwen2"), root / "base")
    g = torch.Generator().manual_seed(3)
    direction = save_direction(root / "direction.safetensors", torch.randn(tiny.HIDDEN, generator=g), {"layer": 1})
    edited = root / "edited"
    orthogonalize(base, load_direction(direction), edited, base_model="org/base")
    return {"root": root, "base": base, "edited": edited, "direction": direction}


@pytest.fixture(scope="module")
def models(env):
    """The same checkpoint in memory, split over CPU and disk, and all on disk (float32 everywhere)."""
    return {
        "memory": load_model(str(env["base"]), dtype="float32"),
        "split": load_model(str(env["base"]), dtype="float32", device="auto", max_memory=SPLIT),
        "disk": load_model(str(env["base"]), dtype="float32", device="auto", max_memory=ALL_DISK),
    }


def texts(lm, n: int = 6) -> list[str]:
    return chat_format(lm.tokenizer).format_all(short("harmful").instructions[:n])


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-6) -> bool:
    return bool((a - b).abs().max() <= rel * b.abs().max())


# ---------------------------------------------------------------- placement


def test_max_memory_is_parsed_in_accelerates_syntax():
    assert parse_max_memory("cpu=16GiB") == {"cpu": 16 * 2**30}
    assert parse_max_memory(" cpu = 500MB , disk=1GB ") == {"cpu": 500 * 10**6, "disk": 10**9}
    assert parse_max_memory({"cpu": "2KiB"}) == {"cpu": 2048}
    assert parse_max_memory(None) is None
    for bad, needle in [
        ("cpu16GiB", "is not DEVICE=SIZE"),
        ("cpu=lots", "is not a size"),
        ("tpu=1GiB", "is not cpu, disk, mps, cuda:N"),
        ("cpu=1GiB,cpu=2GiB", "names 'cpu' twice"),
        ("", "is empty"),
    ]:
        with pytest.raises(RefusalEditError, match=needle):
            parse_max_memory(bad)
    if not torch.cuda.is_available():
        with pytest.raises(RefusalEditError, match="cuda:0, but this machine has no CUDA device"):
            parse_max_memory("cuda:0=70GiB,cpu=1GiB")


def test_max_memory_splits_the_model_over_cpu_and_disk_and_says_where(models, capsys, env):
    split, disk = models["split"], models["disk"]
    assert split.device == "auto" and dispatched(split.model)
    assert split.placement == "layers 0 cpu, 1-2 disk (embeddings cpu, head disk)"
    assert layer_devices(split.model) == ["cpu", "disk", "disk"]
    assert disk.placement == "layers 0-2 disk (embeddings disk, head disk)"
    assert input_device(disk.model) == torch.device("cpu")  # the first parameter is on the meta device
    assert next(disk.model.parameters()).device.type == "meta"
    load_model(str(env["base"]), dtype="float32", device="auto", max_memory=SPLIT)
    assert "placed by accelerate (float32): layers 0 cpu, 1-2 disk" in capsys.readouterr().err


def test_auto_with_room_is_the_plain_model(env):
    lm = load_model(str(env["base"]), device="auto")
    assert lm.device == "cpu" and lm.dtype == "float32" and not dispatched(lm.model)
    assert lm.placement == "layers 0-2 cpu (embeddings cpu, head cpu)"


def test_offload_options_need_device_auto(env):
    with pytest.raises(RefusalEditError, match="`max_memory` and `offload_dir` apply to `device` auto"):
        load_model(str(env["base"]), max_memory="cpu=1GiB")


def test_dtype_auto_picks_bfloat16_when_float32_would_not_fit_and_says_why(env, capsys):
    lm = load_model(str(env["base"]), device="auto", max_memory="cpu=60KB")  # float32 needs ~140 KiB
    assert lm.dtype == "bfloat16"
    assert "dtype auto: bfloat16, since in float32 the weights" in capsys.readouterr().err
    import psutil

    class Tight:
        available = 10_000

    real = psutil.virtual_memory
    try:
        psutil.virtual_memory = lambda: Tight()  # the plain CPU load: the free RAM is the budget
        assert load_model(str(env["base"])).dtype == "bfloat16"
    finally:
        psutil.virtual_memory = real


def test_no_room_on_disk_is_an_error_before_any_weight_is_read(env, monkeypatch, tmp_path):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(placement_module, "_needs_copy", lambda model: True)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 1000, 1000))
    from transformers import Qwen2ForCausalLM

    monkeypatch.setattr(Qwen2ForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(
        RefusalEditError, match=r"the model does not fit: .* go to disk offload, but .* has 1000 B free"
    ):
        load_model(str(env["base"]), dtype="float32", device="auto", max_memory=SPLIT, offload_dir=tmp_path / "off")
    assert not (tmp_path / "off").exists()


def test_offloaded_loads_read_the_checkpoint_without_a_memory_map(env, monkeypatch):
    """transformers reads every tensor while loading, offloaded ones too: through a memory map the whole
    checkpoint would count in RSS at once (measured: 3.4 GiB peak for a 3 GB model, 1.7 GiB with pread)."""
    import transformers.modeling_utils as loader

    seen: list[str | None] = []
    real = loader.safe_open

    def spy(*args, **kwargs):
        seen.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(loader, "safe_open", spy)
    load_model(str(env["base"]), dtype="float32", device="auto", max_memory=SPLIT)
    assert seen and set(seen) == {"pread"}
    seen.clear()
    load_model(str(env["base"]), dtype="float32")  # nothing on disk: the memory map, as transformers does
    assert set(seen) == {"mmap"} and loader.safe_open is spy


@pytest.mark.parametrize("rewritten", [False, True], ids=["in-place", "dat"])
def test_offloaded_weights_are_read_without_a_map_chunk_by_chunk(env, monkeypatch, rewritten):
    """accelerate maps, copies, then converts each offloaded weight every time its module runs (a bfloat16
    embedding used in float32: 1.9 GiB resident for a 0.47 GB tensor); ours reads it with pread into its final
    tensor. Same tensors, same logits, and none of accelerate's mapped reads while running."""
    import accelerate.utils.offload as acc

    import refusal_edit.checkpoint.safetensors_io as sio
    from refusal_edit.offload import offloaded_modules

    if rewritten:  # weights accelerate rewrote into its own .dat files
        monkeypatch.setattr(placement_module, "_needs_copy", lambda model: True)
    lm = load_model(str(env["base"]), dtype="bfloat16", device="auto", max_memory=ALL_DISK)
    loaders = {id(m._hf_hook.weights_map.dataset): m._hf_hook.weights_map.dataset for m in offloaded_modules(lm.model)}
    assert loaders and {type(x).__name__ for x in loaders.values()} == {"ChunkedWeightsLoader"}
    (loader,) = loaders.values()
    real = functools.partial(acc.OffloadedWeightsLoader.__getitem__, loader)
    small = sio.chunk_rows
    monkeypatch.setattr(sio, "chunk_rows", lambda info, budget: small(info, budget=100))  # many chunks per tensor
    for key in loader.index:
        ours, theirs = loader[key], real(key)
        assert ours.dtype == theirs.dtype == torch.bfloat16 and torch.equal(ours, theirs), key

    def mapped(*args, **kwargs):
        raise AssertionError("a memory-mapped read while running")

    monkeypatch.setattr(acc, "safe_open", mapped)
    monkeypatch.setattr(acc, "load_offloaded_weight", mapped)
    x = tiny.token_batch()
    with torch.no_grad():
        logits = lm.model(x).logits
    monkeypatch.undo()
    loader.__class__ = acc.OffloadedWeightsLoader
    with torch.no_grad():
        assert torch.equal(logits, lm.model(x).logits)


def test_a_rewritten_offload_goes_to_its_own_folder_removed_with_the_model(env, monkeypatch, tmp_path):
    monkeypatch.setattr(placement_module, "_needs_copy", lambda model: True)
    root = tmp_path / "off"
    lm = load_model(str(env["base"]), dtype="float32", device="auto", max_memory=SPLIT, offload_dir=root)
    (folder,) = list(root.iterdir())
    assert folder.name.startswith("base-")
    x = tiny.token_batch()
    with torch.no_grad():
        assert torch.isfinite(lm.model(x).logits).all()
    del lm
    gc.collect()
    assert not folder.exists() and root.exists()


def test_a_module_larger_than_the_budget_is_said_before_any_weight_is_read(env):
    plan = placement_module.plan_auto(env["base"], {}, "float32", parse_max_memory(ALL_DISK), None)
    assert plan.dtype == torch.float32 and set(plan.device_map.values()) == {"disk"}
    (note,) = plan.notes
    assert note.startswith("memory budget: ") and "is read from disk whole while it runs" in note
    assert note.endswith("more than the 1000 B allowed")
    assert not placement_module.plan_auto(env["base"], {}, "float32", parse_max_memory(SPLIT), None).notes


def test_loading_reads_no_weight_that_runs_from_disk(env, monkeypatch):
    """transformers reads every tensor while loading and drops the offloaded ones; those read in place from
    the checkpoint when they run are not read at all (it held two of the largest at once: 2.1 GiB peak loading
    a 2.7 GB checkpoint), the others once, straight into their tensor."""
    import refusal_edit.offload as offload

    read: list[str] = []
    real = offload.read_tensor
    monkeypatch.setattr(
        offload, "read_tensor", lambda path, name, dtype=None: read.append(name) or real(path, name, dtype)
    )
    load_model(str(env["base"]), dtype="float32", device="auto", max_memory=ALL_DISK)
    assert read == []
    split = load_model(str(env["base"]), dtype="float32", device="auto", max_memory=SPLIT)
    on_cpu = {n for n, p in split.model.named_parameters() if p.device.type == "cpu"}
    assert on_cpu and set(read) == on_cpu


RSS_PROBE = """
import json, sys, threading, time
from refusal_edit.activations import mean_activations
from refusal_edit.forward import PromptBatch
from refusal_edit.loading import load_model
from refusal_edit.prompts import builtin, chat_format

def status(key):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(key + ":"))

lm = load_model(sys.argv[1], dtype=sys.argv[2], device="auto", max_memory="cpu=1KB")
texts = chat_format(lm.tokenizer).format_all([t[:16] for t in builtin("harmful").instructions[:4]])
batch = PromptBatch(lm.tokenizer, texts, batch_size=4)
before, peak, done = status("VmRSS"), [0], threading.Event()
try:  # the kernel's own peak, reset here
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    thread = None
except OSError:  # no clear_refs: sample instead
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], status("VmRSS"))
            time.sleep(0.01)
    thread = threading.Thread(target=sample)
    thread.start()
mean_activations(lm.model, batch, 2, lambda logits: logits[:, 0], lambda s: s == s)
done.set()
if thread is None:
    peak[0] = status("VmHWM")
else:
    thread.join()
print(json.dumps({"before": before, "peak": peak[0], "after": status("VmRSS"), "placement": lm.placement}))
"""


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """A llama of 24 layers of 13 MiB in float32 (6.6 in bfloat16): a pass that kept every layer it read would
    hold 24 of them."""
    model = tiny.build(
        "llama", hidden_size=512, intermediate_size=1536, num_hidden_layers=24, num_attention_heads=8, head_dim=64
    )
    return tiny.save(model, tmp_path_factory.mktemp("wide") / "model")


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_an_offloaded_pass_holds_one_layer_at_a_time(wide, dtype):
    """Resident memory during an activations pass of a model all on disk grows by at most about one layer's
    weights (accelerate loads one module's weights for its call), in every dtype. Measured in a fresh process:
    the kernel's peak RSS over the pass (VmHWM, reset before it) and the RSS after it, against the RSS before
    it. A pass that kept what it read would hold all 24 layers (145 MiB in bfloat16, 289 in float32)."""
    import subprocess
    import sys

    config = json.loads((wide / "config.json").read_text())
    hidden, inter, kv = config["hidden_size"], config["intermediate_size"], config["num_key_value_heads"]
    width = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    layer = width * (2 * hidden * hidden + 2 * hidden * kv * config["head_dim"] + 3 * hidden * inter)
    res = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, str(wide), dtype], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["placement"] == "layers 0-23 disk (embeddings disk, head disk)"
    # The module in flight, its output, the runtime's own first-use growth and allocator slack (a busy CI machine
    # showed more than two layers' worth once); keeping every layer would still be twice this.
    bound = 3 * layer + 48 * 2**20
    for when in ("peak", "after"):  # during the pass, and what stays after it
        growth = got[when] - got["before"]
        assert growth <= bound, f"{when}: +{growth / 2**20:.0f} MiB with layers of {layer / 2**20:.1f} MiB"


# ---------------------------------------------------------------- the same numbers


def test_logits_and_hooks_match_in_memory(models):
    ref, outs = models["memory"].model, {k: v.model for k, v in models.items() if k != "memory"}
    x = tiny.token_batch()
    r = torch.randn(tiny.HIDDEN, generator=torch.Generator().manual_seed(1))
    rows = RowGroups([0, 1, 0])
    edits = [None, full_ablation(r / r.norm(), 3)]

    def run(model):
        with torch.no_grad():
            plain = model(x).logits
            with ablation(model, r):
                ablated = model(x).logits
            with addition(model, r, 1, coeff=2.0, site="attn"):
                added = model(x).logits
            with edit_hooks_by_row(model, edits, rows):
                rows.select([0, 1, 2])
                grouped = model(x).logits
        return plain, ablated, added, grouped

    want = run(ref)
    for model in outs.values():
        for a, b in zip(run(model), want, strict=True):
            assert close(a, b)


def test_prefix_cache_reuse_works_offloaded(models):
    ref = models["memory"]
    batch = PromptBatch(ref.tokenizer, texts(ref), batch_size=4)
    assert batch.prefix_len(models["split"].model) > 0  # the shared prefix's KV cache is reused offloaded too
    want = PromptBatch(ref.tokenizer, texts(ref), batch_size=4, share_prefix=False).run(ref.model)
    for name in ("split", "disk"):
        assert close(batch.run(models[name].model), want)


def test_tune_proxies_match_in_memory(models):
    from refusal_edit.tuning.proxies import ProxyScorer

    r = torch.randn(tiny.HIDDEN, generator=torch.Generator().manual_seed(2))
    bank = DirectionBank(r / r.norm())
    scores = {}
    for name, lm in models.items():
        harmless = chat_format(lm.tokenizer).format_all(short("harmless").instructions[:4])
        scorer = ProxyScorer(lm.model, lm.tokenizer, texts(lm, 4), harmless, [5, 6], batch_size=3)
        scores[name] = (scorer.base, scorer.score(EditSpec(), bank))
    for name in ("split", "disk"):
        for a, b in zip(scores[name], scores["memory"], strict=True):
            assert a.refusal == pytest.approx(b.refusal, rel=1e-5)
            assert a.kl == pytest.approx(b.kl, rel=1e-4, abs=1e-7)


def test_proxy_backward_takes_one_prompt_at_a_time_when_weights_are_on_disk(models, monkeypatch):
    """The backward keeps every layer's activations of its batch, which no weight budget covers."""
    import refusal_edit.directions.attribution as proxy

    sizes: list[int] = []
    real = proxy.PromptBatch
    monkeypatch.setattr(proxy, "PromptBatch", lambda tok, t, size, **kw: sizes.append(size) or real(tok, t, size, **kw))
    R = torch.nn.functional.normalize(torch.randn(2, tiny.HIDDEN, generator=torch.Generator().manual_seed(4)), dim=-1)
    for name in ("disk", "split", "memory"):
        lm = models[name]
        proxy.attribution_bypass(lm.model, lm.tokenizer, texts(lm, 4), R, [5, 6], 4)
    assert sizes == [1, 1, 4]


def test_backward_reloads_offloaded_weights_instead_of_keeping_them(models):
    from refusal_edit.directions.attribution import attribution_bypass

    ref, disk = models["memory"], models["disk"]
    R = torch.nn.functional.normalize(torch.randn(4, tiny.HIDDEN, generator=torch.Generator().manual_seed(4)), dim=-1)
    want, base = attribution_bypass(ref.model, ref.tokenizer, texts(ref, 4), R, [5, 6], 4)
    got, got_base = attribution_bypass(disk.model, disk.tokenizer, texts(disk, 4), R, [5, 6], 4)
    assert close(got, want, 1e-5) and got_base == pytest.approx(base, rel=1e-6)

    def loaded_weights_alive(model, reload: bool) -> int:
        """Weights (parameters that were not there before: loaded copies) still alive after a forward."""

        def parameters() -> set[int]:
            gc.collect()
            return {id(o) for o in gc.get_objects() if isinstance(o, torch.nn.Parameter) and o.device.type != "meta"}

        for p in model.parameters():
            p.requires_grad_(False)
        handle = model.get_input_embeddings().register_forward_hook(lambda m, a, o: o.detach().requires_grad_(True))
        try:
            before = parameters()
            with reloaded_in_backward(model) if reload else contextlib.nullcontext():
                out = model(tiny.token_batch()).logits.sum()
            count = len(parameters() - before)
            out.backward()
            return count
        finally:
            handle.remove()

    assert loaded_weights_alive(disk.model, reload=False) > 0  # autograd keeps what it multiplied with
    assert loaded_weights_alive(disk.model, reload=True) == 0


def test_extract_offloaded_gives_the_same_means_and_the_same_candidate(models, tmp_path):
    settings = ExtractSettings(
        n_train=6,
        n_val=4,
        batch_size=4,
        refusal_tokens=["i", "as"],
        selection=SelectionSettings(kl_threshold=1e9, induce_threshold=-1e9, top_k=2, batch_size=4),
    )
    done = {}
    for name in ("memory", "split"):  # the split model reads part of its weights from disk
        lm = models[name]
        fmt = chat_format(lm.tokenizer)
        done[name] = run_extract(lm, fmt, short("harmful"), short("harmless"), settings, tmp_path / name)
    ref = done["memory"]
    for name in ("split",):
        res = done[name]
        for side in ("harmful", "harmless"):
            a, b = getattr(res.candidates, side), getattr(ref.candidates, side)
            assert close(a.sum_all, b.sum_all) and a.count_all == b.count_all
            assert a.sum_all.dtype == torch.float64 and a.sum_all.device.type == "cpu"
        assert close(res.candidates.mean_diff, ref.candidates.mean_diff)
        assert (res.selection.chosen.layer, res.selection.chosen.position) == (
            ref.selection.chosen.layer,
            ref.selection.chosen.position,
        )
        assert res.selection.chosen.bypass == pytest.approx(ref.selection.chosen.bypass, rel=1e-5)
        run = json.loads((tmp_path / name / "run.json").read_text())
        assert run["device"] == "auto" and run["placement"] == models[name].placement


def test_evaluate_offloaded_gives_the_same_numbers(env):
    fast = EvalSettings(n=4, max_new_tokens=4, batch_size=3, samples=3)

    def numbers(**placed):
        report = evaluate(str(env["base"]), str(env["edited"]), settings=fast, dtype="float32", **placed)
        summary = report.summary()
        return {k: v for k, v in summary.items() if isinstance(v, int | float) and "seconds" not in k}, report

    want, ref = numbers()
    got, rep = numbers(device="auto", max_memory=SPLIT)
    assert rep.base["device"] == "auto"
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert [s.edited for s in rep.samples] == [s.edited for s in ref.samples]


# ---------------------------------------------------------------- batch size


def test_batch_size_auto_is_a_number_that_fits(models, capsys):
    lm = models["split"]
    assert parse_batch_size("auto") == "auto" and parse_batch_size("8") == 8 and parse_batch_size(3) == 3
    with pytest.raises(RefusalEditError, match="`batch_size` must be a whole number or auto"):
        parse_batch_size("many")
    rows = resolve_batch_size("auto", lm.model, lm.tokenizer, texts(lm))
    assert 1 <= rows <= 6
    assert f"batch size auto: {rows}" in capsys.readouterr().err
    assert resolve_batch_size(5, lm.model, lm.tokenizer, texts(lm)) == 5


def test_out_of_memory_backs_off_once_and_says_so(env, capsys):
    from refusal_edit.generation import generate

    lm = load_model(str(env["base"]), dtype="float32")
    prompts = texts(lm, 6)
    want = PromptBatch(lm.tokenizer, prompts, batch_size=6).run(lm.model)
    want_gen = [g.token_ids for g in generate(lm.model, lm.tokenizer, prompts, 3, batch_size=6, description=None)]
    forward = lm.model.forward
    biggest: list[int] = []

    @functools.wraps(forward)
    def tight(*args, **kwargs):
        rows = (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape[0]
        biggest.append(rows)
        if rows > 3:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes.")
        return forward(*args, **kwargs)

    lm.model.forward = tight
    got = PromptBatch(lm.tokenizer, prompts, batch_size=6).run(lm.model)
    assert close(got, want) and getattr(lm.model, BATCH_LIMIT) == 3
    assert capsys.readouterr().err.count("out of memory at 6 prompts per batch: continuing with 3") == 1
    biggest.clear()
    gen = [g.token_ids for g in generate(lm.model, lm.tokenizer, prompts, 3, batch_size=6, description=None)]
    assert gen == want_gen and max(biggest) == 3  # later calls use the smaller batch from the start

    @functools.wraps(forward)
    def tighter(*args, **kwargs):
        if (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape[0] > 1:
            raise RuntimeError("CUDA error: out of memory.")
        return forward(*args, **kwargs)

    lm.model.forward = tighter
    with pytest.raises(RefusalEditError, match="out of memory with 3 prompts per batch after backing off once"):
        PromptBatch(lm.tokenizer, prompts, batch_size=6).run(lm.model)


# ---------------------------------------------------------------- the command line


def test_cli_extract_with_device_auto(env, tmp_path, cli):
    fast = ["--n-train", "6", "--n-val", "4", "--top-k", "2", "--refusal-tokens", "i,as"]
    permissive = ["--kl-threshold", "1e9", "--induce-threshold", "-1e9"]
    args = ["--device", "auto", "--max-memory", SPLIT, "--dtype", "float32", "--batch-size", "auto"]
    res = cli("extract", env["base"], "--out", tmp_path / "run", *fast, *permissive, *args)
    assert res.code == 0, res.text
    assert "placed by accelerate (float32): layers 0 cpu, 1-2 disk" in res.err and "batch size auto:" in res.err
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["placement"].startswith("layers 0 cpu, 1-2 disk") and run["settings"]["batch_size"] >= 1
    res = cli("extract", env["base"], "--out", tmp_path / "r2", "--device", "cpu", "--max-memory", "cpu=1GiB")
    assert res.code == 1 and "--max-memory and --offload-dir apply to --device auto" in res.err
    res = cli("extract", env["base"], "--out", tmp_path / "r3", "--device", "auto", "--max-memory", "cpu:1GiB")
    assert res.code == 1 and "--max-memory entry 'cpu:1GiB' is not DEVICE=SIZE" in res.err
    res = cli("extract", env["base"], "--out", tmp_path / "r4", "--batch-size", "lots")
    assert res.code == 1 and "--batch-size must be a whole number or auto" in res.err
    assert not any((tmp_path / n).exists() for n in ("r2", "r3", "r4"))


# ---------------------------------------------------------------- CUDA (skipped without one)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_cpu_and_disk_split_matches_the_cpu_run(env, tmp_path):
    settings = ExtractSettings(
        n_train=6,
        n_val=4,
        batch_size=4,
        refusal_tokens=["i", "as"],
        selection=SelectionSettings(kl_threshold=1e9, induce_threshold=-1e9, top_k=2, batch_size=4),
    )
    ref = load_model(str(env["base"]), dtype="float32")
    spread = load_model(str(env["base"]), dtype="float32", device="auto", max_memory="0=60KB,cpu=40KB")
    assert "cuda:0" in spread.placement and dispatched(spread.model)
    a = run_extract(ref, chat_format(ref.tokenizer), short("harmful"), short("harmless"), settings, tmp_path / "a")
    b = run_extract(spread, chat_format(ref.tokenizer), short("harmful"), short("harmless"), settings, tmp_path / "b")
    cos = torch.nn.functional.cosine_similarity(a.candidates.mean_diff.flatten(), b.candidates.mean_diff.flatten(), 0)
    assert cos > 0.9999
    assert (a.selection.chosen.layer, a.selection.chosen.position) == (
        b.selection.chosen.layer,
        b.selection.chosen.position,
    )


def test_sandwich_norm_hooks_work_offloaded(tmp_path):
    """Gemma 2's sandwich-norm gains are read for the hooks even when the norm's weights sit on disk."""
    base = tiny.save(tiny.build("gemma2"), tmp_path / "gemma2")
    memory = load_model(str(base), dtype="float32")
    disk = load_model(str(base), dtype="float32", device="auto", max_memory=ALL_DISK)
    x = tiny.token_batch()
    r = torch.randn(tiny.HIDDEN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with ablation(memory.model, r):
            want = memory.model(x).logits
        with ablation(disk.model, r):
            got = disk.model(x).logits
    assert close(got, want, rel=1e-5)
