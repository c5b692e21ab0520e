"""Atomic file writes: a crash never leaves a half-written checkpoint, manifest or report."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unirep.errors import MissingFileError, NonFiniteError
from unirep.faults import failpoint

if TYPE_CHECKING:  # torch loads with the first weights read or written, not with unirep.io
    import torch


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        failpoint(f"write:{path.parent.name}/{path.name}")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Atomically write UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def strict_json(data: Any) -> Any:
    """``data`` with every non-finite float (NaN, ±inf) replaced by None: JSON has no NaN."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: strict_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(v) for v in data]
    return data


def atomic_write_json(path: Path, data: Any) -> None:
    """Atomically write strict JSON (indented, keys in insertion order; NaN and ±inf as null)."""
    atomic_write_text(path, json.dumps(strict_json(data), indent=2, allow_nan=False) + "\n")


def read_json(path: Path, what: str = "file") -> Any:
    """Read JSON, with an error naming the file when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON: {err}") from err


def read_error_reason(err: BaseException) -> str:
    """The short cause of a read error: the JSON decoder's or the OS's, without the path."""
    cause = err.__cause__ or err
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(cause).splitlines()[0] if str(cause) else type(cause).__name__


def read_record(path: Path, what: str, remedy: str, error: type[Exception]) -> dict[str, Any]:
    """The JSON object (a record) at ``path``, or one line that names ``what`` and the file and
    ends with ``remedy``: :class:`MissingFileError` when it is absent, ``error`` when it is
    unreadable, not JSON or not an object."""
    path = Path(path)
    try:
        record = read_json(path, what=what)
    except FileNotFoundError as err:
        raise MissingFileError(f"{err}; {remedy}") from None
    except (ValueError, OSError) as err:  # truncated, not UTF-8, unreadable
        raise error(
            f"{what} {str(path)!r} cannot be read ({read_error_reason(err)}); {remedy}"
        ) from None
    if not isinstance(record, dict):
        raise error(f"{what} {str(path)!r} is not a record; {remedy}")
    return record


SEAL = "sha256"  # the key of a sealed record's own digest (:func:`write_sealed_json`)


def json_digest(data: Any) -> str:
    """sha256 of ``data`` as canonical strict JSON (sorted keys, NaN and ±inf as null)."""
    text = json.dumps(strict_json(data), sort_keys=True, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_sealed_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically write the record ``data`` with its own sha256 under :data:`SEAL`, so that a
    changed value is found when it is read back (:func:`read_sealed_json`)."""
    atomic_write_json(path, {**data, SEAL: json_digest(data)})


def read_sealed_json(path: Path) -> dict[str, Any]:
    """A record written by :func:`write_sealed_json`, without its seal.

    Raises:
        ValueError: the file is missing, is not a JSON object, carries no seal, or its content
            does not match its seal; the message says which, without naming the file (the
            caller names it with what it means).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path.name} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path.name} is not valid JSON ({err})") from err
    if not isinstance(data, dict) or not isinstance(data.get(SEAL), str):
        raise ValueError(f"{path.name} carries no sha256 of its content")
    record = {k: v for k, v in data.items() if k != SEAL}
    if json_digest(record) != data[SEAL]:
        raise ValueError(f"{path.name} does not match the sha256 written with it")
    return record


def check_finite_weights(state: dict[str, torch.Tensor], where: str) -> None:
    """Raise :class:`NonFiniteError` naming the first tensor of ``state`` with a NaN or inf."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            raise NonFiniteError(f"{where}: tensor {name!r} holds NaN or inf values")


def state_mismatch(
    expected: dict[str, torch.Tensor],
    state: dict[str, torch.Tensor],
    against: str,
    words: tuple[str, str, str] = ("missing keys", "unexpected keys", "shape mismatches"),
) -> str:
    """Why the weights ``state`` do not fit a network whose state is ``expected``, in one line
    (the first three keys of each kind, named by ``words``; shapes as ``file (…) vs <against>
    (…)``), or ``""`` when they fit. Checked before any loading, so nothing loads in part."""
    missing = [k for k in expected if k not in state]  # in the network's order
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs {against} {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    return "; ".join(
        f"{word} {items[:3]}{' ...' if len(items) > 3 else ''}"
        for word, items in zip(words, (missing, unexpected, shapes), strict=True)
        if items
    )


def save_weights(path: Path, state: dict[str, torch.Tensor]) -> str:
    """Atomically save a state dict as safetensors; returns the sha256 of the file.

    Weights holding NaN or inf are never written (:class:`NonFiniteError` names the tensor).
    """
    path = Path(path)
    check_finite_weights(state, f"refusing to write {str(path)!r}")
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.detach().contiguous().cpu() for k, v in state.items()}))
    return file_sha256(path)


PACKED_VALUES, PACKED_MASK = ".__values__", ".__mask__"


def pack_sparse(
    state: dict[str, torch.Tensor], min_zeros: float = 0.5, min_numel: int = 256
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """A state dict with its mostly-zero tensors packed, for a file that shrinks with sparsity
    (safetensors has no sparse layout): each floating tensor of at least ``min_numel`` entries
    and at least a ``min_zeros`` share of exact zeros becomes ``<name>.__values__`` (its
    non-zero entries, 1-D, same dtype) and ``<name>.__mask__`` (uint8: one bit per entry,
    numpy's ``packbits`` order). Returns (state, ``{name: {"shape", "dtype"}}`` of the packed
    tensors); :func:`unpack_sparse` restores the exact tensors."""
    import numpy as np
    import torch

    out: dict[str, torch.Tensor] = {}
    packed: dict[str, dict[str, Any]] = {}
    for name, tensor in state.items():
        t = tensor.detach().cpu()
        if t.is_floating_point() and t.numel() >= min_numel:
            nonzero = t != 0
            if 1 - float(nonzero.float().mean()) >= min_zeros:
                bits = np.packbits(nonzero.flatten().numpy())
                out[name + PACKED_VALUES] = t[nonzero].contiguous()
                out[name + PACKED_MASK] = torch.from_numpy(bits)
                packed[name] = {"shape": list(t.shape), "dtype": str(t.dtype).split(".")[-1]}
                continue
        out[name] = t
    return out, packed


def unpack_sparse(
    state: dict[str, torch.Tensor], packed: dict[str, dict[str, Any]]
) -> dict[str, torch.Tensor]:
    """The state dict :func:`pack_sparse` packed, each packed tensor rebuilt exactly; a
    ``ValueError`` names a tensor whose parts are missing or do not agree."""
    import numpy as np
    import torch

    out = dict(state)
    for name, info in packed.items():
        values, bits = state.get(name + PACKED_VALUES), state.get(name + PACKED_MASK)
        if values is None or bits is None:
            raise ValueError(f"packed tensor {name!r} lacks its values or its mask")
        shape = [int(s) for s in info["shape"]]
        numel = math.prod(shape)
        mask = torch.from_numpy(np.unpackbits(bits.numpy(), count=numel).astype(bool))
        if int(mask.sum()) != values.numel():
            raise ValueError(
                f"packed tensor {name!r} has {values.numel()} values for {int(mask.sum())} "
                "kept entries"
            )
        full = torch.zeros(numel, dtype=values.dtype)
        full[mask] = values
        out.pop(name + PACKED_VALUES, None)
        out.pop(name + PACKED_MASK, None)
        out[name] = full.view(shape)
    return out


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors state dict on the CPU, naming the file when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    try:
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"weights file {str(path)!r} cannot be read: {err}") from err


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes (recorded in manifests to tie students to teachers)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def clean_partial(directory: Path) -> list[Path]:
    """Delete what a killed process left half-written under ``directory``: the hidden temporary
    files and checkpoint folders that atomic writes rename into place (``.<name>.*.tmp``,
    ``.step_NNNNNN.tmp``). They are never read; returns what was removed."""
    removed = sorted(p for p in Path(directory).rglob(".*.tmp") if p.exists())
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed
