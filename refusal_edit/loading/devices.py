"""Which device a model runs on, decided in one place for every command.

`auto` (the CLI's default) picks CUDA, then Apple's MPS, then the CPU, and says which on stderr (one line,
once the model is loaded), so that a user with a GPU never has to name it and a run's log shows where it
ran. On CUDA and on the CPU, `auto` also lets accelerate place the layers (over the GPUs, then the CPU, then
disk: `placement.plan_auto`), so a model that does not fit still runs; on MPS the whole model goes to the GPU
(its memory is the machine's RAM: there is nothing to spread it over). `cpu`, `cuda` and `mps` put the whole
model there.
"""

from __future__ import annotations

from dataclasses import dataclass

from refusal_edit.errors import RefusalEditError

DEVICES = ("auto", "cpu", "cuda", "mps")
DEFAULT = "auto"


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


@dataclass(frozen=True)
class Device:
    """A `device` option resolved: the device the model runs on (`kind`), whether accelerate places the
    layers (`spread`: `auto` on CUDA or the CPU), and for `auto` why it picked `kind`."""

    requested: str
    kind: str  # cpu | cuda | mps
    spread: bool
    why: str = ""

    @property
    def said(self) -> str:
        """The line that names what `auto` picked ("" for a device the user named)."""
        return f"device auto: {self.kind} ({self.why})" if self.requested == "auto" else ""


def _auto() -> tuple[str, str]:
    if cuda_available():
        import torch

        count = torch.cuda.device_count()
        name = torch.cuda.get_device_name(0)
        return "cuda", name + (f" and {count - 1} more GPU{'s' * (count > 2)}" if count > 1 else "")
    if mps_available():
        return "mps", "Apple GPU"
    return "cpu", "no CUDA or MPS device"


def resolve_device(device: str) -> Device:
    """`device` checked and, for `auto`, decided: CUDA, then MPS, then the CPU (`Device.said` says which; the
    loader prints it). A device that is not there is a one-line error."""
    if device not in DEVICES:
        raise RefusalEditError(f"unknown `device` {device!r} ({', '.join(DEVICES)})")
    if device == "auto":
        kind, why = _auto()
        return Device(device, kind, spread=kind != "mps", why=why)
    if device == "cuda" and not cuda_available():
        raise RefusalEditError("`device` cuda was requested but no CUDA device is available")
    if device == "mps" and not mps_available():
        raise RefusalEditError("`device` mps was requested but no Apple MPS device is available")
    return Device(device, device, spread=False)
