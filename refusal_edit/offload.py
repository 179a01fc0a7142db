"""Models that accelerate spread over devices (GPUs, then CPU, then disk): where their parts are, and what
running them needs that a model in one place does not.

`load_model(device="auto")` has transformers place the modules (`device_map`), and accelerate's hooks move
each module's inputs to its execution device and, for offloaded modules, load the weights just before the
module runs and drop them right after. The rest of the package only needs three things from here: where to
put inputs (`input_device`), one line saying where the layers went (`describe_placement`), a backward
pass that does not keep every offloaded weight alive (`reloaded_in_backward`), and offloaded weights read
without memory maps (`read_offloaded_in_chunks`).
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn


def device_map(model: nn.Module) -> dict[str, Any] | None:
    """The map accelerate dispatched the model with (module name -> GPU index, "cpu" or "disk"), else None."""
    found = getattr(model, "hf_device_map", None)
    return dict(found) if isinstance(found, dict) and found else None


def device_name(device: Any) -> str:
    """A device-map value as a word: 0 -> "cuda:0"; "cpu" and "disk" as they are."""
    if isinstance(device, int):
        return f"cuda:{device}"
    return str(device)


def input_device(model: nn.Module) -> torch.device:
    """Where a forward pass's inputs go.

    A dispatched model runs on its main device (accelerate's rule: the first accelerator in the map, else
    the CPU); its first parameter may sit on the meta device, offloaded. Any other model: where its first
    parameter is.
    """
    mapped = device_map(model)
    if mapped is None:
        return next(model.parameters()).device
    accelerators = [d for d in mapped.values() if d not in ("cpu", "disk")]
    return torch.device(device_name(accelerators[0]) if accelerators else "cpu")


def module_device(model: nn.Module, module: nn.Module) -> str:
    """Where `module` of `model` lives: its device-map entry (the longest prefix of its name), or the device
    of its first parameter when the model was not dispatched."""
    mapped = device_map(model)
    if mapped is None:
        first = next(module.parameters(), None)
        return "cpu" if first is None else str(first.device)
    name = next((n for n, m in model.named_modules() if m is module), None)
    if name is None:
        return "?"
    best, length = mapped.get("", "?"), -1
    for key, device in mapped.items():
        if (key == name or name.startswith(key + ".")) and len(key) > length:
            best, length = device, len(key)
    return device_name(best)


def _runs(devices: list[str]) -> str:
    """["cpu", "cpu", "disk"] -> "0-1 cpu, 2 disk"."""
    parts, start = [], 0
    for i in range(1, len(devices) + 1):
        if i == len(devices) or devices[i] != devices[start]:
            span = str(start) if i - 1 == start else f"{start}-{i - 1}"
            parts.append(f"{span} {devices[start]}")
            start = i
    return ", ".join(parts)


def layer_devices(model: nn.Module) -> list[str]:
    """The device of every decoder layer, in order."""
    from refusal_edit.anatomy import anatomy

    return [module_device(model, layer) for layer in anatomy(model).layers]


def describe_placement(model: nn.Module) -> str:
    """One line saying where the layers went, e.g. "layers 0-9 cpu, 10-23 disk (embeddings cpu, head disk)"."""
    from refusal_edit.anatomy import anatomy

    anat = anatomy(model)
    line = f"layers {_runs(layer_devices(model))}"
    ends = {"embeddings": anat.embeddings[0] if anat.embeddings else None, "head": model.get_output_embeddings()}
    extra = [f"{what} {module_device(model, m)}" for what, m in ends.items() if m is not None]
    return f"{line} ({', '.join(extra)})" if extra else line


def offloaded_modules(model: nn.Module) -> list[nn.Module]:
    """Modules whose weights accelerate keeps off their execution device (CPU or disk) between calls."""
    from accelerate.utils import has_offloaded_params

    return [m for m in model.modules() if has_offloaded_params(m)]


def dispatched(model: nn.Module) -> bool:
    """Whether accelerate spread the model over several devices or offloaded part of it (hooks in place)."""
    mapped = device_map(model)
    return mapped is not None and (len(set(mapped.values())) > 1 or "disk" in mapped.values())


def on_disk(model: nn.Module) -> bool:
    """Whether any part of the model is offloaded to disk (weights that cannot be edited in place)."""
    mapped = device_map(model)
    return mapped is not None and "disk" in mapped.values()


@contextmanager
def reloaded_in_backward(model: nn.Module) -> Iterator[None]:
    """Keep offloaded weights out of the autograd graph: a backward pass reloads them instead.

    Autograd saves the weights a layer multiplied with, to compute input gradients. An offloaded module's
    weights are loaded for its forward call only; saved by autograd, every offloaded weight of the model
    would stay in memory until the backward pass ends (a model larger than RAM would not fit). Inside this
    context a saved tensor that views an offloaded module's loaded weight is stored as a reference and loaded
    again from the module's offload map when the backward pass needs it. Other tensors are kept as usual.
    A model without offloaded modules is unaffected.
    """
    modules = offloaded_modules(model)
    if not modules:
        yield
        return

    def owner(t: torch.Tensor) -> tuple[nn.Module, str] | None:
        base = t._base if t._base is not None else t
        if not isinstance(base, nn.Parameter) or base.device.type == "meta":
            return None
        for module in modules:
            for name, param in module._parameters.items():
                if param is base:
                    return module, name
        return None

    def pack(t: torch.Tensor) -> Any:
        found = owner(t)
        if found is None:
            return t
        return (found, t.dtype, t.device, t.size(), t.stride(), t.storage_offset())

    def unpack(saved: Any) -> torch.Tensor:
        if isinstance(saved, torch.Tensor):
            return saved
        (module, name), dtype, device, size, stride, offset = saved
        weight = module._hf_hook.weights_map[name].to(device=device, dtype=dtype)
        return weight.as_strided(size, stride, offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def read_offloaded_in_chunks(model: nn.Module) -> int:
    """Have the model's offloaded weights read without memory maps, converted to their dtype chunk by chunk.

    Why: accelerate loads an offloaded weight kept in place in a safetensors file through a memory map, copies
    it, then converts the copy (bfloat16 file, float32 model): the mapped pages, the copy and the converted
    tensor are all resident at once - 1.9 GiB for a 0.47 GB bfloat16 embedding used in float32, several times
    the module's own size, every time it runs. Weights it rewrote (`.dat` files) are memory-mapped and copied
    too. Here each weight is read with `pread` into its final tensor, a chunk at a time, so a module costs its
    own size plus one chunk. accelerate has no option for this; its loader objects (one per model) get our
    subclass. Returns how many loaders were switched (0: nothing offloaded to disk).
    """
    from accelerate.utils.offload import OffloadedWeightsLoader

    switched = 0
    for module in offloaded_modules(model):
        loader = getattr(getattr(module._hf_hook, "weights_map", None), "dataset", None)
        if type(loader) is OffloadedWeightsLoader:
            loader.__class__ = _chunked_loader_class()
            switched += 1
    return switched


@functools.cache
def _chunked_loader_class() -> type:
    from accelerate.utils.offload import OffloadedWeightsLoader

    class ChunkedWeightsLoader(OffloadedWeightsLoader):
        def __getitem__(self, key: str) -> torch.Tensor:
            if key in self.state_dict or self.device not in (None, "cpu"):
                return super().__getitem__(key)
            info = self.index[key]
            if info.get("safetensors_file") is not None:
                dtype = getattr(torch, info["dtype"]) if "dtype" in info else None
                return read_tensor(info["safetensors_file"], info.get("weight_name", key), dtype)
            return _read_dat(os.path.join(self.save_folder, f"{key}.dat"), info)

    return ChunkedWeightsLoader


READ_CHUNK = 8 << 20  # float32 bytes per chunk; the stored bytes go through one reused buffer of at most this
MAPPED_MIN = 1 << 20  # tensors read for a run of at least this many bytes get pages of their own (`mapped_empty`)


def mapped_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized tensor in an anonymous memory map of its own, unmapped when the tensor is freed.

    Why: an offloaded weight lives for one module call. Allocated by torch it comes from glibc's heap as soon
    as glibc's dynamic mmap threshold has risen past its size (it rises to the largest block freed, up to 32
    MiB: most weights of a layer in bfloat16), and a freed heap block goes back to the system only when
    nothing live sits above it; each reloaded layer may then land on fresh pages and resident memory grows
    with every layer read. Pages of its own are returned the moment the tensor is freed, whatever the heap
    holds. Small tensors (norm gains, biases) stay on the heap.
    """
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes < MAPPED_MIN:
        return torch.empty(shape, dtype=dtype)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with warnings.catch_warnings():  # "non-writable buffer": the map is writable
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(region, dtype=dtype, count=math.prod(shape))
    return flat.view(shape)  # the storage keeps `region` alive; freeing the last view unmaps it


def read_tensor(path: str | os.PathLike[str], name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Tensor `name` of a safetensors file, read with `pread` in row chunks straight into a tensor of `dtype`.

    The chunks land in one buffer kept for the process: a fresh buffer per chunk (tens of MB, under glibc's
    dynamic mmap threshold) left the freed memory on the heap, and resident memory grew with every layer
    read (measured: 2.52 GiB vs 2.24 with accelerate's loader on a 28-layer model, before this buffer).
    The tensor itself gets pages of its own (`mapped_empty`), returned to the system when it is freed.
    """
    from refusal_edit.checkpoint.safetensors_io import DTYPES, TensorReader, chunk_rows

    header = _header(str(path))
    info = header.tensors[name]
    out = mapped_empty(tuple(info.shape), dtype or DTYPES[info.dtype])
    with _BUFFER_LOCK, TensorReader(header) as reader:
        if not info.shape:
            return reader.tensor(info).to(out.dtype)
        for start, stop in chunk_rows(info, READ_CHUNK):
            out[start:stop].copy_(reader.rows(info, start, stop, _buffer(info.row_span(start, stop)[1])))
    return out


_BUFFER_LOCK = threading.Lock()
_BUFFERS: list[torch.Tensor] = []


def _buffer(size: int) -> torch.Tensor:
    """The reused read buffer, at least `size` bytes (call with `_BUFFER_LOCK` held)."""
    if not _BUFFERS or _BUFFERS[0].numel() < size:
        _BUFFERS[:] = [torch.empty(max(size, READ_CHUNK), dtype=torch.uint8)]
    return _BUFFERS[0]


@functools.lru_cache(maxsize=64)
def _header(path: str) -> Any:
    from refusal_edit.checkpoint.safetensors_io import read_header

    return read_header(Path(path))


def _read_dat(path: str, info: dict[str, Any]) -> torch.Tensor:
    """accelerate's `.dat` format (raw bytes; bfloat16 stored as int16, float8 as int8), read without a map
    of the file, into pages of its own (`mapped_empty`)."""
    dtype = getattr(torch, info["dtype"])
    shape = tuple(info["shape"]) or (1,)
    out = mapped_empty(shape, dtype)
    view = memoryview(out.view(torch.uint8).reshape(-1).numpy())
    with open(path, "rb", buffering=0) as fh:
        got = 0
        while got < len(view):
            n = fh.readinto(view[got:])
            if not n:
                raise OSError(f"unexpected end of file reading {path}")
            got += n
    return out if info["shape"] else out[0]
