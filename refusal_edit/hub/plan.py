"""What a push of a model folder would send, decided entirely offline.

The folder must be a complete model (config, weights with their index, tokenizer, a valid edit record)
and its card must carry the metadata the Hub indexes; a missing card is rendered from the record and
kept in memory (the user's folder is never written to). Only what a model repository holds goes up (the
allow list, `hub.allow`), and only if no file holds a secret (`hub.secrets`). Whatever an include pattern
says, only regular files inside the folder go up: symbolic links are skipped whatever they point to (a
link to /etc/shadow must never be uploaded), and so are caches, unfinished output, OS junk, hidden files,
unedited weights in other formats, and anything holding pickled data. Pickles are found by content, not
by name: they run code when loaded and can carry any suffix (`.pkl`, `.pth.tar`, `.bin.bak`), inside a
zip (torch.save), a numpy object array or a compressed stream.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import hashlib
import io
import lzma
import os
import pickletools
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from refusal_edit.checkpoint.atomic import TMP_MARK
from refusal_edit.checkpoint.card import CARD, effect_tag, render_card, validate_card
from refusal_edit.checkpoint.layout import FOREIGN_WEIGHTS, INDEX, TOKENIZER_FILES, open_checkpoint
from refusal_edit.checkpoint.record import RECORD, EditRecord, hub_model_id
from refusal_edit.edits.spec import describe_variant
from refusal_edit.errors import RefusalEditError
from refusal_edit.hub.allow import GGUF, MODEL_FILES, NOT_A_MODEL_FILE, SAFETENSORS, card_images, included, kind_of
from refusal_edit.hub.secrets import find_secret, scan_file

CACHE_DIRS = frozenset({"__pycache__", ".cache", ".ipynb_checkpoints", ".huggingface", ".git"})
OS_JUNK = frozenset({".DS_Store", "Thumbs.db", "desktop.ini", "__MACOSX", ".Spotlight-V100", ".Trashes"})
PARTIAL_SUFFIXES = (".lock", ".tmp", ".part", ".partial", ".incomplete", ".swp", ".pyc", "~")
WINDOW = 1 << 20  # bytes of a file (or decompressed stream) inspected for pickled data
MEMBER_WINDOW = 1 << 16  # bytes of each archive member: at most MAX_MEMBERS of them are decompressed
MAX_MEMBERS = 1024  # a bigger archive is not inspected, and not published

PICKLED_WEIGHTS = tuple(s for s in FOREIGN_WEIGHTS if s != ".gguf")  # GGUF is data: the allow list decides
PICKLE = "pickled data (runs code when loaded): never published"


def _inflate(stream: BinaryIO) -> BinaryIO:
    """The start of a raw zlib stream (joblib's compressed pickles), decompressed."""
    return io.BytesIO(zlib.decompressobj().decompress(stream.read(WINDOW), WINDOW))


_ZLIB = tuple((b"\x78" + b, _inflate) for b in (b"\x01", b"\x5e", b"\x9c", b"\xda"))
_COMPRESSED = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open), *_ZLIB)


@dataclass
class UploadFile:
    """One file of the commit: read from `source`, or `content` generated in memory (never written locally)."""

    path_in_repo: str
    size: int
    source: Path | None = None
    content: bytes | None = None

    @property
    def generated(self) -> bool:
        return self.source is None

    def digest(self, name: str, header: bytes = b"") -> str:
        """hashlib `name` of `header` + the bytes (sha256: the Hub's LFS id; sha1 of "blob N\\0": git's)."""
        h = hashlib.new(name, header)
        if self.content is not None:
            h.update(self.content)
        else:
            with open(self.source, "rb") as fh:  # type: ignore[arg-type]
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
        return h.hexdigest()


@dataclass
class UploadPlan:
    """What a push of `root` would send."""

    root: Path
    files: list[UploadFile]
    skipped: list[tuple[str, str]]  # (path relative to root, why it stays local)
    record: EditRecord
    card: str
    card_generated: bool
    metadata: dict[str, Any]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def names(self) -> list[str]:
        return [f.path_in_repo for f in self.files]


def check_gguf_folder(root: Path, include: tuple[str, ...] = (), base_model: str | None = None) -> UploadPlan:
    """A folder of GGUF files this tool wrote (edited models, LoRA adapters): each carries its record; the card
    is rendered from the first one's (`library_name: gguf`)."""
    from refusal_edit.gguf.edit import RECORD_KEY
    from refusal_edit.gguf.file import GGUFFile

    records = []
    names = sorted(p.name for p in root.glob("*.gguf") if p.is_file() and not p.is_symlink())
    for name in names:
        text = GGUFFile(root / name).value(RECORD_KEY)
        if text is None:
            raise RefusalEditError(f"{name} in {root} was not written by refusal-edit (no {RECORD_KEY}): not published")
        records.append(EditRecord.from_json(text, f"{name}:{RECORD_KEY}"))
    return _output_plan(root, records[0], names, frozenset(names), include, base_model, GGUF)


def check_adapter_folder(root: Path, include: tuple[str, ...] = (), base_model: str | None = None) -> UploadPlan:
    """A PEFT adapter folder written by `orthogonalize --format peft` (config, weights, record)."""
    needed = ["adapter_config.json", "adapter_model.safetensors", RECORD]
    for name in needed:
        if not (root / name).is_file():
            raise RefusalEditError(f"incomplete adapter folder {root}: missing {name}")
    record = EditRecord.load(root, required=True)
    assert record is not None
    return _output_plan(root, record, needed, frozenset({"adapter_model.safetensors"}), include, base_model)


def check_folder(path: Path, include: tuple[str, ...] = (), base_model: str | None = None) -> UploadPlan:
    """Decide what a push of `path` sends; raise a one-line error if the folder is not a whole model, or if a
    file that would go up holds a secret.

    What goes up is what a model repository holds (`hub.allow.MODEL_FILES`), the images the card shows, and
    what an `include` pattern names on purpose; everything else is listed as skipped with the reason.
    `base_model` (a Hub id) names the base model where the record does not: the card and the record are
    then generated with it, in memory.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise RefusalEditError(f"model folder not found: {root}")
    if not (root / "config.json").is_file():
        if (root / "adapter_config.json").is_file():
            return check_adapter_folder(root, include, base_model)
        if any(root.glob("*.gguf")):
            return check_gguf_folder(root, include, base_model)
    ckpt = open_checkpoint(root)  # config.json, weights, index and every shard header (truncation included)
    shards = {s.path.name for s in ckpt.shards}
    unlisted = sorted(p.name for p in root.glob("*.safetensors") if p.name not in shards and not kind_is_adapter(p))
    if unlisted:
        raise RefusalEditError(f"{unlisted[0]} in {root} is not part of the checkpoint ({INDEX} does not list it)")
    for name, what in (("tokenizer_config.json", "tokenizer_config.json"), (RECORD, f"{RECORD} (the edit record)")):
        if not (root / name).is_file():
            raise RefusalEditError(f"incomplete model folder {root}: missing {what}")
    if not any((root / name).is_file() for name in TOKENIZER_FILES):
        raise RefusalEditError(f"incomplete model folder {root}: missing tokenizer (tokenizer.json or tokenizer.model)")
    record = EditRecord.load(root, required=True)
    assert record is not None
    needed = ["config.json", RECORD, "tokenizer_config.json", *sorted(shards), *([INDEX] if ckpt.index else [])]
    return _output_plan(root, record, [*needed, *TOKENIZER_FILES], frozenset(shards), include, base_model)


def _output_plan(
    root: Path,
    record: EditRecord,
    needed: list[str],
    trusted: frozenset[str],
    include: tuple[str, ...] = (),
    base_model: str | None = None,
    fmt: str = SAFETENSORS,
) -> UploadPlan:
    """The plan of a checked folder (a model, an adapter or GGUF files): the card, what the allow list of `fmt`
    keeps, and the secret scan; `needed` files must not be skipped; `trusted` are already validated weights."""
    generated = {}  # path in repo -> content made in memory (the user's folder is never written to)
    if base_model is not None:
        if hub_model_id(base_model) is None:
            raise RefusalEditError(f"`base_model` {base_model!r} is not a Hub model id (ORG/NAME)")
        record = dataclasses.replace(record, base_model=base_model)
        generated[RECORD] = record.to_json().encode("utf-8")

    has_card = (root / CARD).is_file()
    if not has_card and record.base_model is None:
        raise RefusalEditError(
            f"{RECORD} does not name the base model, which the model card must: pass `base_model` ORG/NAME "
            f"(the Hub id the edit descends from), or write a {CARD} whose metadata names it (base_model: ORG/NAME)"
        )
    try:
        card = (
            (root / CARD).read_text(encoding="utf-8")
            if has_card
            else render_card(record, describe_variant(record.spec))
        )
    except UnicodeDecodeError:
        raise RefusalEditError(f"{CARD} is not UTF-8 text") from None
    if not has_card:
        generated[CARD] = card.encode("utf-8")
    metadata = validate_card(card, record)

    images = card_images(card)

    def select(rel: str) -> str | None:
        if rel in generated:
            return "replaced by the generated file"
        if kind_of(rel, fmt) is None and rel not in images and not included(rel, include):
            return NOT_A_MODEL_FILE
        return None

    keep, skipped = walk(root, select, trusted=trusted)
    files = [UploadFile(p.relative_to(root.resolve()).as_posix(), p.stat().st_size, source=p) for p in keep]
    why = dict(skipped)
    for name in [*needed, *([CARD] if has_card else [])]:
        if name in why and name not in generated:
            raise RefusalEditError(f"{name} in {root} cannot be published: {why[name]}")
    files += [UploadFile(name, len(data), content=data) for name, data in generated.items()]
    files.sort(key=lambda f: f.path_in_repo)
    check_secrets(files)
    return UploadPlan(root, files, skipped, record, card, CARD in generated, metadata)


def kind_is_adapter(p: Path) -> bool:
    return any(f.what == "PEFT adapter" and f.matches(p.name) for f in MODEL_FILES)


def check_secrets(files: list[UploadFile]) -> None:
    """Refuse the push if any file that would go up holds a secret (by content, whatever its name)."""
    for f in files:
        if f.generated:
            found = find_secret(f.content or b"")
            where = ""
        else:
            try:
                hit = scan_file(f.source)  # type: ignore[arg-type]
            except OSError as exc:
                raise RefusalEditError(f"{f.path_in_repo} cannot be read: {exc.strerror or exc}") from None
            found, where = (hit[0], f" (line {hit[1]})") if hit else (None, "")
        if found:
            raise RefusalEditError(
                f"{f.path_in_repo} holds what looks like {found}{where}: nothing was pushed; remove the secret "
                "from the file (and revoke it if it was ever shared)"
            )


def default_repo(record: EditRecord, root: Path) -> str:
    """`<model>-abliterated` (in the token owner's namespace): the base model's name, else the folder's."""
    model = record.base_model.split("/")[1] if record.base_model else Path(root).resolve().name
    suffix = f"-{effect_tag(record)}"
    return model if model.lower().endswith(suffix) else model + suffix


def stray_reason(name: str, is_dir: bool) -> str | None:
    """Why a file or directory must not be published by its name, or None if it may belong to the model."""
    if TMP_MARK in name:
        return "temporary output of an unfinished write"
    if name in CACHE_DIRS:
        return "cache or version-control directory"
    if name in OS_JUNK or name.startswith("._"):
        return "OS metadata"
    if name.startswith("."):
        return "hidden"
    if not is_dir and name.endswith(PARTIAL_SUFFIXES):
        return "lock, temporary or partial file"
    if not is_dir and name.lower().endswith(PICKLED_WEIGHTS):
        return "non-safetensors weights (unedited or pickled): never published"
    return None


def _starts_pickle(head: bytes) -> bool:
    """Whether `head` (the first bytes of a stream) is pickle opcodes: a complete pickle, or a binary
    one (protocol 2+) that parses for several opcodes up to the end of what was read."""
    ops = 0
    try:
        for op, _, _ in pickletools.genops(io.BytesIO(head)):
            ops += 1
            if op.name == "STOP":
                return ops > 1
    except ValueError:  # a byte that is no opcode, or the window ended inside the stream
        pass
    return head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05") and ops >= 3


def _sniff(stream: BinaryIO, depth: int = 0, window: int = WINDOW) -> str | None:
    head = stream.read(window)
    if _starts_pickle(head):
        return PICKLE
    if head.startswith(b"\x93NUMPY") and b"'|O'" in head[:1024]:
        return "numpy array of pickled objects: never published"
    if depth >= 2:
        return None
    for magic, opener in _COMPRESSED:
        if head.startswith(magic):
            stream.seek(0)
            try:
                return _sniff(opener(stream), depth + 1)  # type: ignore[arg-type]
            except (OSError, EOFError, lzma.LZMAError, zlib.error):
                return None  # not a readable stream of that kind: its bytes are what they are
    if head.startswith(b"PK\x03\x04"):
        stream.seek(0)
        try:
            with zipfile.ZipFile(stream) as zf:
                members = zf.infolist()
                if len(members) > MAX_MEMBERS:
                    return f"archive of more than {MAX_MEMBERS} files: not inspected, never published"
                for m in members:
                    with zf.open(m) as member:
                        if m.filename.endswith(".pkl") or _sniff(member, depth + 1, MEMBER_WINDOW):  # type: ignore[arg-type]
                            return f"zip archive holding pickled data ({m.filename}): never published"
        except (zipfile.BadZipFile, OSError, NotImplementedError, RuntimeError, EOFError) as exc:
            return f"zip archive that cannot be inspected ({exc}): never published"
    return None


def pickle_reason(path: Path) -> str | None:
    """Why `path` must not be published because of what it holds (pickled data), or None."""
    try:
        with open(path, "rb") as fh:
            return _sniff(fh)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"


def walk(
    root: Path, select: Callable[[str], str | None], trusted: frozenset[str] = frozenset()
) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files to publish and skipped entries `(relative path, why)`, both in a stable order.

    Stray and symlinked directories are pruned whole. `select(relative path)` says why a regular file is
    not wanted (None: wanted). `trusted` names (relative paths) were already validated as safetensors and
    are not inspected for pickles.
    """
    root = Path(root).resolve()
    keep: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        rel_dir = here.relative_to(root)
        pruned = []
        for d in sorted(dirnames):
            why = stray_reason(d, is_dir=True) or ("symbolic link" if (here / d).is_symlink() else None)
            if why is None:
                pruned.append(d)
            else:
                skipped.append(((rel_dir / d).as_posix() + "/", why))
        dirnames[:] = pruned
        for f in sorted(filenames):
            p, rel = here / f, (rel_dir / f).as_posix()
            why = stray_reason(f, is_dir=False)
            if why is None and p.is_symlink():
                why = "symbolic link (links are never followed)"
            elif why is None and (not p.is_file() or not p.resolve().is_relative_to(root)):
                why = "not a regular file inside the folder"
            elif why is None:
                why = select(rel) or (None if rel in trusted else pickle_reason(p))
            if why is None:
                keep.append(p)
            else:
                skipped.append((rel, why))
    keep.sort(key=lambda p: p.relative_to(root).as_posix())
    skipped.sort()
    return keep, skipped
