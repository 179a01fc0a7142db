"""`device` auto (the CLI's default): CUDA, then MPS, then the CPU, said in one line; availability monkeypatched."""

from __future__ import annotations

import pytest

from refusal_edit.errors import RefusalEditError
from refusal_edit.loading import devices
from refusal_edit.loading.devices import resolve_device
from refusal_edit.loading.model import load_model


def machine(monkeypatch, cuda: int = 0, mps: bool = False) -> None:
    """Pretend this machine has `cuda` GPUs and/or an Apple GPU."""
    import torch

    monkeypatch.setattr(devices, "cuda_available", lambda: cuda > 0)
    monkeypatch.setattr(devices, "mps_available", lambda: mps)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H100")


@pytest.mark.parametrize(
    ("cuda", "mps", "kind", "spread", "said"),
    [
        (2, True, "cuda", True, "device auto: cuda (NVIDIA H100 and 1 more GPU)"),
        (1, False, "cuda", True, "device auto: cuda (NVIDIA H100)"),
        (0, True, "mps", False, "device auto: mps (Apple GPU)"),
        (0, False, "cpu", True, "device auto: cpu (no CUDA or MPS device)"),
    ],
)
def test_auto_picks_cuda_then_mps_then_cpu_and_says_so(monkeypatch, cuda, mps, kind, spread, said):
    machine(monkeypatch, cuda, mps)
    got = resolve_device("auto")
    assert (got.kind, got.spread, got.said) == (kind, spread, said)


def test_named_devices_are_checked(monkeypatch):
    machine(monkeypatch, cuda=0, mps=False)
    assert resolve_device("cpu") == devices.Device("cpu", "cpu", spread=False)
    assert resolve_device("cpu").said == ""  # a device the user named is not announced
    with pytest.raises(RefusalEditError, match="`device` cuda was requested but no CUDA device is available"):
        resolve_device("cuda")
    with pytest.raises(RefusalEditError, match="`device` mps was requested but no Apple MPS device is available"):
        resolve_device("mps")
    with pytest.raises(RefusalEditError, match=r"unknown `device` 'tpu' \(auto, cpu, cuda, mps\)"):
        resolve_device("tpu")
    machine(monkeypatch, cuda=1, mps=True)
    assert resolve_device("mps").kind == "mps" and resolve_device("cuda").kind == "cuda"


def test_load_model_auto_on_the_cpu_is_the_plain_model(tiny_dir, monkeypatch, capsys):
    machine(monkeypatch, cuda=0, mps=False)
    lm = load_model(str(tiny_dir("qwen2")), device="auto")
    assert lm.device == "cpu" and lm.dtype == "float32" and not hasattr(lm.model, "hf_device_map")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("device auto")]
    assert lines == [
        "device auto: cpu (no CUDA or MPS device); placed by accelerate (float32): layers 0-2 cpu "
        "(embeddings cpu, head cpu)"
    ]


def test_offload_options_do_not_apply_on_mps(tiny_dir, monkeypatch):
    machine(monkeypatch, cuda=0, mps=True)
    with pytest.raises(RefusalEditError, match="apply to `device` auto on CUDA or the CPU"):
        load_model(str(tiny_dir("qwen2")), device="auto", max_memory="cpu=1GiB")


def test_cli_names_a_missing_device_in_one_line(tiny_dir, tmp_path, cli, monkeypatch):
    machine(monkeypatch, cuda=0, mps=False)  # the default, auto, is said by test_quantize's CLI run
    res = cli("extract", tiny_dir("qwen2"), "--out", tmp_path / "r2", "--device", "mps")
    assert res.code == 1 and "--device mps was requested but no Apple MPS device is available" in res.err
    assert not (tmp_path / "r2").exists()
