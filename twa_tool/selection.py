"""Which checkpoints a run uses: filters, numeric slices, metric top-k, and alias de-duplication.

Order of operations (documented in ``twa average --help``): discover in numeric order ->
``--include``/``--exclude`` globs -> drop aliases (symlinks, hard links, byte-identical copies, the same
torch save under another name; the first name in numeric order is kept, so ``20.pt`` wins over ``last.pt``,
and of unnumbered ones a name saying newest, so ``last.pt`` wins over ``best.pt``)
-> leave out unnumbered files a trajectory cannot place (``unplaced``) -> ``--range`` ->
``--every`` -> ``--last`` -> ``--top-k`` by a stored metric (kept in numeric order).
Given a ``same_weights`` test, an unnumbered torch file (``best.pth`` holding ``model.state_dict()``) that holds
the weights of a numbered one (the epoch file that saved them with the optimizer) is an alias too.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .checkpoints import CheckpointFile, name_words, zip_contents_digest, zip_contents_key
from .config import Selection
from .errors import CheckpointError, ConfigError, exclude_hint, include_hint

#: Bytes hashed from each end of a file to find candidate copies cheaply before a full hash.
PROBE_BYTES = 1 << 20


@dataclass(frozen=True)
class Dropped:
    """A discovered checkpoint the selection left out, and why. ``unplaced``: left out by ``unplaced`` (the run
    warns about it, with ``unplaced_warning``)."""

    name: str
    reason: str
    alias_of: str | None = None
    unplaced: bool = False


@dataclass(frozen=True)
class Chosen:
    files: tuple[CheckpointFile, ...]
    dropped: tuple[Dropped, ...]

    def too_few(self, directory: Path, found: int) -> CheckpointError | None:
        """The error for a selection TWA cannot average (fewer than 2 distinct checkpoints), else None."""
        if len(self.files) >= 2:
            return None
        aliases = sum(1 for d in self.dropped if d.alias_of is not None)
        why = f" ({aliases} of them links or byte-identical copies of others, counted once)" if aliases else ""
        return CheckpointError(f"{directory}: {len(self.files)} of {found} checkpoints selected{why}; TWA needs at "
                               f"least 2 distinct ones: widen the selection (--range/--last/--every/--include) or "
                               f"add checkpoints")


def _probe(path: Path) -> tuple[int, str]:
    """(size, hash of the first and last MiB): equal for copies, almost never for different weights."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(PROBE_BYTES))
        if size > 2 * PROBE_BYTES:
            f.seek(-PROBE_BYTES, os.SEEK_END)
            digest.update(f.read(PROBE_BYTES))
    return size, digest.hexdigest()


def _full_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _denied(path: Path) -> bool:
    """Whether this process may not read ``path``: a regular file is opened (never a FIFO or device: opening one
    could wait), a folder listed."""
    try:
        if path.is_dir():
            next(path.iterdir(), None)
        elif path.is_file():
            with open(path, "rb"):
                pass
    except PermissionError:
        return True
    return False


def missing_target(entry: CheckpointFile) -> str | None:
    """Why ``entry`` cannot be read at all (a symlink to nothing, a loop of symlinks, a file or folder this user may
    not read), with the fix; None when it can be read."""
    try:
        real = entry.path.resolve()
        exists = real.exists()
    except (RuntimeError, OSError):  # a loop of links: RuntimeError before Python 3.13, then OSError (ELOOP)
        return (f"{entry.path}: a symlink loop ({entry.name} -> {os.readlink(entry.path)} -> ... never reaches a "
                f"file); remove the link or pass {exclude_hint(entry.name)}")
    if exists:
        if not _denied(real):
            return None
        fix = "chmod -R a+rX" if real.is_dir() else "chmod a+r"
        return (f"{entry.path}: permission denied reading it; make it readable ({fix}) or pass "
                f"{exclude_hint(entry.name)}")
    what = f"a symlink to {os.readlink(entry.path)}, which" if entry.path.is_symlink() else "it"
    return f"{entry.path}: {what} does not exist; remove the link or pass {exclude_hint(entry.name)}"


#: How an alias is named when it holds another checkpoint's weights in another container.
SAME_WEIGHTS = "copy of the weights"


def _storages(contents: tuple | None) -> Counter:
    """The tensor storages of a torch zip (``zip_contents_key``) as a multiset of (size, CRC-32)."""
    return Counter((size, crc) for name, size, crc in contents or () if name.startswith("data/"))


def _weights_twin(entry: CheckpointFile, contents: tuple | None, numbered: list[tuple[CheckpointFile, Counter]],
                  same_weights: Callable[[Path, Path], bool]) -> CheckpointFile | None:
    """The numbered torch file whose weights the unnumbered ``entry`` holds, latest first: candidates are those
    whose storages contain all of ``entry``'s or the reverse (the same tensors, saved with or without the
    optimizer), confirmed by ``same_weights``."""
    mine = _storages(contents)
    if not mine:
        return None
    for other, theirs in reversed(numbered):
        if (mine <= theirs or theirs <= mine) and same_weights(entry.path, other.path):
            return other
    return None


def find_aliases(files: list[CheckpointFile],
                 same_weights: Callable[[Path, Path], bool] | None = None) -> dict[str, tuple[str, str]]:
    """Map each alias name to (name it duplicates, how): symlink/same path, hard link, identical bytes, the
    same torch save under another file name (``torch.save`` names its archive folder after the file), or, given
    ``same_weights``, an unnumbered torch file holding a numbered one's weights (``_weights_twin``)."""
    numbered: list[tuple[CheckpointFile, Counter]] = []
    aliases: dict[str, tuple[str, str]] = {}
    by_real: dict[Path, str] = {}
    by_inode: dict[tuple[int, int], str] = {}
    by_probe: dict[tuple[int, str], list[CheckpointFile]] = {}
    full: dict[Path, str] = {}
    by_contents: dict[tuple, list[CheckpointFile]] = {}
    digests: dict[Path, str | None] = {}
    for entry in files:
        missing = missing_target(entry)
        if missing:
            raise CheckpointError(missing)
        real = entry.path.resolve()
        stat = real.stat()
        if real in by_real:
            aliases[entry.name] = (by_real[real], "symlink to the same file")
            continue
        if (stat.st_dev, stat.st_ino) in by_inode:
            aliases[entry.name] = (by_inode[(stat.st_dev, stat.st_ino)], "hard link to the same file")
            continue
        by_real[real] = entry.name
        by_inode[(stat.st_dev, stat.st_ino)] = entry.name
        if not real.is_file():
            continue  # folders (sharded checkpoints): aliases by path only
        key = _probe(real)
        twin = None
        for other in by_probe.get(key, []):
            if other.path not in full:
                full[other.path] = _full_hash(other.path.resolve())
            full[entry.path] = full.get(entry.path) or _full_hash(real)
            if full[other.path] == full[entry.path]:
                twin = other
                break
        if twin is not None:
            aliases[entry.name] = (twin.name, "byte-identical copy")
            continue
        contents = zip_contents_key(real)  # None unless a torch zip
        for other in by_contents.get(contents, []) if contents is not None else []:
            digests.setdefault(other.path, zip_contents_digest(other.path.resolve()))
            digests.setdefault(entry.path, zip_contents_digest(real))
            if digests[entry.path] is not None and digests[other.path] == digests[entry.path]:
                twin = other
                break
        if twin is not None:
            aliases[entry.name] = (twin.name, SAME_SAVE)
            continue
        if contents is not None and not entry.numbers and same_weights is not None:
            twin = _weights_twin(entry, contents, numbered, same_weights)
            if twin is not None:
                aliases[entry.name] = (twin.name, SAME_WEIGHTS)
                continue
        if contents is not None and entry.numbers:
            numbered.append((entry, _storages(contents)))
        by_probe.setdefault(key, []).append(entry)
        if contents is not None:
            by_contents.setdefault(contents, []).append(entry)
    return aliases


def weight_copies(files: list[CheckpointFile],
                  same_weights: Callable[[Path, Path], bool]) -> dict[str, tuple[str, str]]:
    """Torch files holding another one's weights in another container, whatever their names (``twa soup``'s
    ingredients have no order and are often all unnumbered, which ``find_aliases`` leaves alone): alias name ->
    (the file kept, ``SAME_WEIGHTS``). Kept: the file saved with more than the weights (its storages hold all of
    the other's and more: the fine-tune's own save with its optimizer) over the weights-only copy (``best.pt``),
    then the first in ``files``' order. Candidates are those whose storages contain one another's, confirmed by
    ``same_weights``."""
    stored = [(f, _storages(zip_contents_key(f.path.resolve()))) for f in files if f.path.is_file()]
    stored = [(f, s) for f, s in stored if s]
    kept: list[tuple[CheckpointFile, Counter]] = []
    aliases: dict[str, tuple[str, str]] = {}
    for entry, mine in sorted(stored, key=lambda fs: -fs[1].total()):  # fuller saves first; stable: file order
        twin = next((other for other, theirs in kept if mine <= theirs and same_weights(entry.path, other.path)),
                    None)
        if twin is None:
            kept.append((entry, mine))
        else:
            aliases[entry.name] = (twin.name, SAME_WEIGHTS)
    return {f.name: aliases[f.name] for f in files if f.name in aliases}


def alias_reason(how: str, original: str) -> str:
    """The reason an alias is left out: ``how`` it duplicates ``original`` (a link to *the same file as* it, a
    copy *of* it)."""
    return f"{how} {'as' if how.endswith('the same file') else 'of'} {original}"


def same_file(path: Path, other: Path) -> str | None:
    """How ``path`` duplicates ``other`` (the same file through a symlink or path, a hard link, identical
    bytes), or None when it is another file; the full hash only runs when size and probe agree."""
    if path.resolve() == other.resolve():
        return "symlink to the same file"
    if not (path.is_file() and other.is_file()):
        return None  # folders (sharded checkpoints): by path only
    if os.path.samefile(path, other):
        return "hard link to the same file"
    if _probe(path) == _probe(other) and _full_hash(path) == _full_hash(other):
        return "byte-identical copy"
    if _same_save(path, other):
        return SAME_SAVE
    return None


#: How an alias is named when it is the same torch save under another file name.
SAME_SAVE = "identical torch save"


def _same_save(path: Path, other: Path) -> bool:
    """Two torch zips holding the same object, saved under different names (only the archive folder differs)."""
    key = zip_contents_key(path)
    if key is None or key != zip_contents_key(other):
        return False
    digest = zip_contents_digest(path)
    return digest is not None and digest == zip_contents_digest(other)


#: Words of an unnumbered file's name that say it holds the newest weights, a trainer's rolling save
#: (``last.ckpt``, ``checkpoint_last.pt``, ``model_final.pth``, torchvision's ``checkpoint.pth``).
NEWEST_WORDS = frozenset({"last", "latest", "final", "checkpoint"})
#: Words that say the weights are something else than the newest, whatever else the name says (``last_ema.pt``,
#: ``pretrained_checkpoint.pth``, the start of a fine-tuning run).
NOT_NEWEST_WORDS = frozenset({"best", "ema", "swa", "avg", "average", "averaged", "init", "initial", "pretrained"})
#: What Hugging Face's ``Trainer.save_model`` writes at the end beside the ``checkpoint-<step>/`` folders.
FINAL_SAVES = frozenset({"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                         "pytorch_model.bin.index.json"})
UNPLACED = "unnumbered, not a copy of a numbered checkpoint: its place in the training order is unknown"


def named_newest(name: str) -> bool:
    """Whether an unnumbered file's name says it holds the newest weights (``NEWEST_WORDS``, ``FINAL_SAVES``)."""
    words = name_words(name)
    return name in FINAL_SAVES or bool(words & NEWEST_WORDS and not words & NOT_NEWEST_WORDS)


def unplaced(files: list[CheckpointFile], selection: Selection) -> list[CheckpointFile]:
    """The unnumbered files among at least two numbered ones (aliases already dropped) whose place in the trajectory
    is unknown: not named as the newest save (``named_newest``; those stay, after the numbered ones) and not named
    exactly by an ``--include`` pattern. An EMA, SWA or best-so-far save (``ema_best.pth``) is not the last point
    of the training run, and taking it as such would make it the ``last`` baseline and the end of every slice."""
    if sum(1 for f in files if f.numbers) < 2:
        return []
    return [f for f in files if not f.numbers and not named_newest(f.name)
            and not {f.name, glob.escape(f.name)} & set(selection.include)]


def unplaced_warning(name: str) -> str:
    """The warning for a file ``unplaced`` left out, with the ways to average it."""
    return (f"{name}: left out, {UNPLACED} (an EMA or best-so-far save is not a point of the trajectory); to "
            f"average it as the newest checkpoint, pass {include_hint(name)} beside an --include pattern for the "
            f"numbered ones, or put its epoch or step in its name")


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def filtered_out(name: str, selection: Selection) -> str | None:
    """Why ``--include``/``--exclude`` leave ``name`` out, or None when they keep it."""
    if selection.include and not _matches(name, selection.include):
        return "not matched by --include"
    if _matches(name, selection.exclude):
        return "matched by --exclude"
    return None


def select(files: list[CheckpointFile], selection: Selection,
           metric_of: Callable[[CheckpointFile], float | None] | None = None,
           same_weights: Callable[[Path, Path], bool] | None = None, trajectory: bool = True) -> Chosen:
    """Apply the selection to discovered files (already in numeric order); ``same_weights``: see
    ``find_aliases``. ``trajectory``: the files are points of one training run, so ``unplaced`` ones are left
    out (False for fine-tunes, which have no order)."""
    dropped: list[Dropped] = []
    kept = []
    for entry in files:
        reason = filtered_out(entry.name, selection)
        if reason:
            dropped.append(Dropped(entry.name, reason))
        else:
            kept.append(entry)
    # of copies among unnumbered files, the one named as the newest save is kept (last.pt over the identical best.pt)
    aliases = find_aliases(sorted(kept, key=lambda f: not f.numbers and not named_newest(f.name)) if trajectory
                           else kept, same_weights)
    kept = [f for f in kept if f.name not in aliases]
    left_out = unplaced(kept, selection) if trajectory else []
    gone = {f.name for f in left_out}  # a copy of a file left out is left out with it, not 'counted once'
    dropped += [Dropped(name, UNPLACED, unplaced=True) if original in gone else
                Dropped(name, alias_reason(how, original), alias_of=original)
                for name, (original, how) in aliases.items()]
    dropped += [Dropped(f.name, UNPLACED, unplaced=True) for f in left_out]
    kept = [f for f in kept if f not in left_out]
    steps = selection.slices(kept)
    chosen = selection.apply(kept)
    if selection.top_k is not None:
        chosen = _top_k(chosen, selection, metric_of)
        steps.append((f"not among the {selection.top_k} best by {selection.by} (--top-k {selection.top_k} --by "
                      f"{selection.by} --mode {selection.mode})", chosen))
    names = {f.name for f in chosen}
    # each file left out by the first step that drops it, in the folder's order
    why = {}
    for reason, left in steps:
        after = {f.name for f in left}
        why.update({f.name: reason for f in kept if f.name not in after and f.name not in why})
    dropped += [Dropped(f.name, why[f.name]) for f in kept if f.name not in names]
    return Chosen(files=tuple(chosen), dropped=tuple(dropped))


def _top_k(files: list[CheckpointFile], selection: Selection,
           metric_of: Callable[[CheckpointFile], float | None] | None) -> list[CheckpointFile]:
    scored = [(metric_of(f) if metric_of else None, i, f) for i, f in enumerate(files)]
    missing = [f.name for value, _, f in scored if value is None]
    if missing:
        raise ConfigError(f"--by {selection.by}: no stored value for {missing[0]}"
                          f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}; run `twa inspect` "
                          f"to see the metrics each checkpoint stores")
    sign = 1 if selection.mode == "min" else -1
    best = sorted(scored, key=lambda t: (sign * t[0], t[1]))[: selection.top_k]
    return [f for _, _, f in sorted(best, key=lambda t: t[1])]


def order_conflict(names: list[str], positions: list[int | None], what: str) -> str | None:
    """Cross-check the name order with the step/epoch each file stores; describe the first disagreement."""
    if len(names) < 2 or any(p is None for p in positions):
        return None
    for i in range(1, len(names)):
        if positions[i] < positions[i - 1]:
            return (f"{names[i - 1]} ({what} {positions[i - 1]}) comes before {names[i]} ({what} {positions[i]}) "
                    f"in name order; the name order is used, rename the files or select with --include")
    return None


def mixed_dtypes(headers: dict[str, dict[str, tuple[tuple[int, ...], str]]]) -> str | None:
    """Describe the first tensor whose floating dtype differs between checkpoints (None if consistent)."""
    seen: dict[str, tuple[str, str]] = {}
    for name, tensors in headers.items():
        for key, (_, dtype) in tensors.items():
            if not dtype.startswith(("float", "bfloat")):
                continue
            if key in seen and seen[key][1] != dtype:
                return (f"mixed dtypes: {key} is {seen[key][1]} in {seen[key][0]} but {dtype} in {name}; averaging "
                        f"runs in float64 and each tensor is written in the last checkpoint's dtype "
                        f"(choose with --out-dtype)")
            seen.setdefault(key, (name, dtype))
    return None
