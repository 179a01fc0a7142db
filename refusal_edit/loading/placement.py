"""Where a model's weights go before any is read: the load dtype (`dtype` auto) and, for `device` auto,
accelerate's device map over the GPUs there are, then the CPU, then disk.

The map is computed here, on an empty (meta) copy of the model, with accelerate's own `infer_auto_device_map`
and `get_balanced_memory` - the functions transformers' `device_map="auto"` calls - and then handed to
`from_pretrained` as is. Computing it first lets a load fail before any work (no room on disk for the
offloaded weights) and say in one line where the layers will go.

Disk offload of a safetensors checkpoint needs no copy: transformers reads the offloaded weights from the
checkpoint's own files (converting dtype on the fly). Only weights that transformers converts while loading
(fused expert tensors of some MoE models) are written to the offload folder, so only those need free disk.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refusal_edit.arch import stock_model_class
from refusal_edit.errors import RefusalEditError
from refusal_edit.loading.cache import cache_root

GIB = 2**30
CPU_SHARE = 0.9  # without `max_memory`, weights may take this share of free memory (transformers' own rule)


def parse_max_memory(spec: str | Mapping[Any, Any] | None) -> dict[int | str, int] | None:
    """`cpu=16GiB,cuda:0=70GiB` (accelerate's keys and sizes) -> {0: bytes, "cpu": bytes}.

    Keys: `cpu`, `disk`, `mps`, `cuda:N`, `cuda` (GPU 0) or a bare GPU index `N`. Sizes: accelerate's units
    (`GiB`/`MiB`/`KiB` are powers of two, `GB`/`MB`/`KB` powers of ten) or plain bytes. Devices not listed
    get nothing, as in accelerate.
    """
    if spec is None:
        return None
    from accelerate.utils import convert_file_size_to_int

    items: list[tuple[Any, Any]]
    if isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        items = []
        for part in (p.strip() for p in str(spec).split(",")):
            if not part:
                continue
            key, sep, size = part.partition("=")
            if not sep or not key.strip() or not size.strip():
                raise RefusalEditError(f"`max_memory` entry {part!r} is not DEVICE=SIZE (e.g. cpu=16GiB,cuda:0=70GiB)")
            items.append((key.strip(), size.strip()))
    if not items:
        raise RefusalEditError("`max_memory` is empty (e.g. cpu=16GiB,cuda:0=70GiB)")
    out: dict[int | str, int] = {}
    for key, size in items:
        device = _device_key(key)
        if device in out:
            raise RefusalEditError(f"`max_memory` names {key!r} twice")
        try:
            value = convert_file_size_to_int(size if isinstance(size, int) else str(size).replace(" ", ""))
        except (ValueError, TypeError):
            value = -1
        if value < 0:
            raise RefusalEditError(f"`max_memory` size {size!r} for {key} is not a size (e.g. 16GiB, 500MB, or bytes)")
        out[device] = value
    return out


def _device_key(key: Any) -> int | str:
    if isinstance(key, int) and not isinstance(key, bool):
        index = key
    else:
        text = str(key).strip().lower()
        if text in ("cpu", "disk", "mps"):
            return text
        if text == "cuda":
            text = "0"
        text = text.removeprefix("cuda:")
        if not text.isdigit():
            raise RefusalEditError(f"`max_memory` device {key!r} is not cpu, disk, mps, cuda:N or a GPU index N")
        index = int(text)
    import torch

    count = torch.cuda.device_count()
    if index >= count:
        have = f"GPUs 0-{count - 1}" if count else "no CUDA device"
        raise RefusalEditError(f"`max_memory` names cuda:{index}, but this machine has {have}")
    return index


def gib(n: float) -> str:
    """Bytes in the largest binary unit that keeps a digit before the point (12.3 GiB, 60.0 KiB)."""
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


@dataclass
class Plan:
    """How a model will be loaded: dtype, device map (None: one device) and the offload folder."""

    dtype: Any  # torch.dtype
    device_map: dict[str, Any] | None = None
    offload_dir: Path | None = None
    notes: list[str] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)  # bytes per device, at `dtype`
    on_disk: frozenset[str] = frozenset()  # parameters read from the checkpoint's own files when they run


def _empty_model(hf_dir: Path, dtype: Any):
    """The model on the meta device (no memory, no weights read): sizes and module names only."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(hf_dir))
    with init_empty_weights():
        model = stock_model_class(config)._from_config(config, dtype=dtype)
    model.tie_weights()  # as from_pretrained does: a tied head is one tensor, placed with the embeddings
    return model


def model_bytes(model: Any, dtype: Any) -> int:
    from accelerate.utils import compute_module_sizes

    return int(compute_module_sizes(model, dtype=dtype)[""])


def memory_budget(max_memory: dict[int | str, int] | None) -> dict[int | str, int]:
    """What weights may use per device: the user's `max_memory`, else accelerate's free memory per GPU and
    `CPU_SHARE` of the free RAM (the rest stays for activations)."""
    from accelerate.utils import get_max_memory

    if max_memory is not None:
        return dict(max_memory)
    found = dict(get_max_memory())
    for key in found:
        if key == "cpu" or isinstance(key, int):  # room for activations (transformers keeps 10% too)
            found[key] = int(found[key] * CPU_SHARE)
    return found


def choose_dtype(dtype: str, device: str, config: dict[str, Any], f32_bytes: int, budget: int) -> tuple[Any, str]:
    """The load dtype for `dtype` auto, and why: on a GPU the checkpoint's own; on the CPU float32 (fast and
    exact there); bfloat16 where float32 would not fit in `budget` bytes (0: not known, no check)."""
    import torch

    if dtype != "auto":
        return getattr(torch, dtype), ""
    stored = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "float32"), torch.float32)
    if device == "cuda" and (stored != torch.float32 or not budget):
        return stored, ""
    if f32_bytes <= budget or (device == "cuda" and not budget):
        return torch.float32, ""
    return torch.bfloat16, (
        f"dtype auto: bfloat16, since in float32 the weights ({gib(f32_bytes)}) would not fit in the "
        f"{gib(budget)} of memory allowed"
    )


def _needs_copy(model: Any) -> bool:
    """Whether transformers converts some weights while loading (it then writes offloaded ones to the
    offload folder instead of reading them in place)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter
    except ImportError:  # another transformers layout: assume the worst
        return True
    try:
        return any(isinstance(c, WeightConverter) for c in get_model_conversion_mapping(model))
    except Exception:
        return True


def _free_disk(folder: Path) -> int:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def over_budget(model: Any, device_map: dict[str, Any], budget: int, dtype: Any) -> str:
    """A note when the CPU budget for weights cannot be kept: the weights placed on the CPU plus the largest
    module read from disk while it runs (accelerate loads an offloaded module's own weights whole for its
    call, then drops them) exceed `budget` bytes; "" when it can (or nothing runs from disk)."""
    from transformers.integrations.accelerate import expand_device_map

    sizes: dict[str, int] = {}
    resident = 0
    named = dict(model.named_parameters())
    placed = expand_device_map(device_map, list(named))
    for name, param in named.items():
        nbytes = param.numel() * param.element_size()  # the empty model is built in the load dtype
        if placed[name] == "disk":
            owner = name.rpartition(".")[0]
            sizes[owner] = sizes.get(owner, 0) + nbytes
        elif placed[name] == "cpu":
            resident += nbytes
    if not sizes:
        return ""
    owner, largest = max(sizes.items(), key=lambda kv: kv[1])
    if resident + largest <= budget:
        return ""
    dtype_name = str(dtype).removeprefix("torch.")
    return (
        f"memory budget: {owner} ({gib(largest)} in {dtype_name}) is read from disk whole while it runs"
        + (f", beside {gib(resident)} of weights kept on the CPU" if resident else "")
        + f": weights will take up to {gib(resident + largest)}, more than the {gib(budget)} allowed"
    )


def plan_auto(
    hf_dir: Path,
    config: dict[str, Any],
    dtype: str,
    max_memory: dict[int | str, int] | None,
    offload_dir: Path | None,
) -> Plan:
    """Decide dtype and device map for `device` auto; raise before any weight is read if the model cannot
    fit even with disk offload."""
    import torch
    from accelerate.utils import compute_module_sizes, get_balanced_memory, infer_auto_device_map

    budget = memory_budget(max_memory)
    on_gpu = any(isinstance(k, int) and v > 0 for k, v in budget.items())
    memory = sum(v for k, v in budget.items() if k != "disk")
    empty = _empty_model(hf_dir, torch.float32)
    torch_dtype, why = choose_dtype(
        dtype, "cuda" if on_gpu else "cpu", config, model_bytes(empty, torch.float32), memory
    )
    if torch_dtype != torch.float32:
        empty = _empty_model(hf_dir, torch_dtype)
    no_split = list(getattr(empty, "_no_split_modules", None) or [])
    balanced = get_balanced_memory(empty, max_memory=dict(budget), no_split_module_classes=no_split, dtype=torch_dtype)
    device_map = infer_auto_device_map(empty, max_memory=balanced, no_split_module_classes=no_split, dtype=torch_dtype)
    sizes = compute_module_sizes(empty, dtype=torch_dtype)
    per_device: dict[str, int] = {}
    for name, device in device_map.items():
        key = f"cuda:{device}" if isinstance(device, int) else str(device)
        per_device[key] = per_device.get(key, 0) + int(sizes.get(name, 0))
    plan = Plan(torch_dtype, device_map, notes=[why] if why else [], sizes=per_device)
    over = over_budget(empty, device_map, budget.get("cpu", 0), torch_dtype)
    if over:
        plan.notes.append(over)
    on_disk = per_device.get("disk", 0)
    if on_disk and not _needs_copy(empty):
        from transformers.integrations.accelerate import expand_device_map

        names = [n for n, _ in empty.named_parameters()]
        plan.on_disk = frozenset(n for n, d in expand_device_map(device_map, names).items() if d == "disk")
    elif on_disk:  # transformers rewrites offloaded weights to the offload folder: check its room
        root = Path(offload_dir).expanduser() if offload_dir is not None else default_offload_root()
        free = _free_disk(root)
        if free < on_disk:
            raise RefusalEditError(
                f"the model does not fit: {gib(on_disk)} of weights go to disk offload, but {root} has "
                f"{gib(free)} free (give `offload_dir` on a larger disk, or more `max_memory`)"
            )
        plan.offload_dir = root
    if set(device_map.values()) <= {"cpu"}:
        plan.device_map = None  # all on the CPU: the plain load, no hooks
    return plan


@contextmanager
def read_without_mmap(active: bool = True, unread: frozenset[str] = frozenset(), dtype: Any = None) -> Iterator[None]:
    """While transformers loads a model with disk-offloaded weights, read its safetensors files with `pread`
    instead of a memory map, each tensor straight into one tensor of its own.

    Why: transformers' loader reads every tensor, the offloaded ones included (it drops those right after),
    through memory maps of the checkpoint files that stay open until loading ends, so every page of the
    checkpoint counts in the process's resident memory at once: a 3 GB model offloaded to disk peaked at
    3.4 GiB RSS while loading, then ran within about 1-2 GiB. safetensors' own `pread` backend reads a tensor
    into a buffer and then copies it, two copies of the largest tensor at once (2.1 GiB peak loading a 2.7 GB
    checkpoint whose embeddings and head are 0.6 GB each). Here a whole-tensor read goes through
    `offload.read_tensor` (one tensor, in pages freed as soon as it is dropped, plus one reused chunk); any
    other access goes to safetensors' `pread` backend. transformers has no option for it (it picks `pread` on
    MPS and Windows only), so its module's `safe_open` is wrapped for the duration of the load. A no-op when
    not `active`.

    Parameters in `unread` (`Plan.on_disk`: offloaded and read in place from the checkpoint when they run,
    which transformers' offload index records from the files, not from the values) are not read at all: the
    loader gets a placeholder of their shape in `dtype` that costs no memory, and drops it. transformers
    holds the tensor it loaded last while it reads the next, so reading them cost two of the largest at once
    (the 0.6 GB head, then the 0.6 GB embeddings) and a second pass over the whole checkpoint.
    """
    import transformers.modeling_utils as loader

    original = getattr(loader, "safe_open", None)
    if not active or original is None:
        yield
        return

    def pread_open(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("backend", "mmap") == "mmap" and kwargs.get("device", "cpu") == "cpu":
            kwargs["backend"] = "pread"
            path = kwargs.get("filename", args[0] if args else None)
            return _PreadFile(original(*args, **kwargs), str(path), unread, dtype)
        return original(*args, **kwargs)

    loader.safe_open = pread_open
    try:
        yield
    finally:
        loader.safe_open = original


WHOLE = (Ellipsis, slice(None), (Ellipsis,), (slice(None),))  # indices that read a tensor whole


class _PreadFile:
    """A safetensors file opened with `pread` whose whole-tensor reads go through `offload.read_tensor`."""

    def __init__(self, handle: Any, path: str, unread: frozenset[str], dtype: Any) -> None:
        self._handle, self._path, self._unread, self._dtype = handle, path, unread, dtype

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    def __enter__(self) -> _PreadFile:
        self._handle.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._handle.__exit__(*exc)

    def get_tensor(self, name: str) -> Any:
        from refusal_edit.offload import read_tensor

        return read_tensor(self._path, name)

    def get_slice(self, name: str) -> _PreadSlice:
        dtype = self._dtype if name in self._unread else None
        return _PreadSlice(self._handle.get_slice(name), self._path, name, dtype)


class _PreadSlice:
    def __init__(self, handle: Any, path: str, name: str, placeholder: Any = None) -> None:
        self._handle, self._path, self._name, self._placeholder = handle, path, name, placeholder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    def __getitem__(self, index: Any) -> Any:
        if any(index is w or (type(index) is type(w) and index == w) for w in WHOLE):
            from refusal_edit.offload import read_tensor

            if self._placeholder is not None:  # one element, broadcast: the shape without the bytes
                import torch

                return torch.zeros((), dtype=self._placeholder).expand(*self._handle.get_shape())

            return read_tensor(self._path, self._name)
        return self._handle[index]


def default_offload_root() -> Path:

    return cache_root() / "offload"


def offload_folder(root: Path, name: str) -> Path:
    """A fresh folder under `root` for one load's offloaded weights (see `remove_with`): nothing but what
    this load wrote is ever deleted."""
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))


def remove_with(owner: Any, folder: Path) -> None:
    """Delete `folder` (this load's offload folder) when `owner` is garbage collected, or at exit."""
    weakref.finalize(owner, shutil.rmtree, str(folder), True)
