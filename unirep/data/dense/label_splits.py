"""Label protocols for partially labelled dense multi-task learning.

A *label mask* is a bool tensor ``[N, T]``: row ``i`` is training image ``i`` (dataset order),
column ``j`` is ``tasks[j]``; True means image ``i``'s label for that task may be used. This
module only makes, stores, reads and describes masks; applying one to the data pipeline (zeroing
the unlabelled targets) lives elsewhere.

Protocols (:data:`PROTOCOLS`), after MTPSL (Li et al., "Learning Multiple Dense Prediction Tasks
from Partially Annotated Data", CVPR 2022) and JTR (Nishi et al., CVPR 2024):

- ``full``: every image labelled for every task.
- ``one-label``: every image labelled for exactly one task, balanced across tasks.
- ``random-labels``: every image labelled for a random non-empty, non-full subset of the tasks.
- ``fraction``: task ``t`` labelled on exactly ``round(f_t · N)`` images, chosen per task.
- ``file``: the mask is read from a label-split file (:func:`read_label_split`); MTPSL's shipped
  ``.pth`` settings are converted with :func:`import_mtpsl`. A file holds one row per training
  image, or one per image of the whole training folder in file order, as published splits do
  (MTPSL's 795 NYUv2 / 2975 Cityscapes rows) when the run carves its validation images from that
  folder: :func:`split_rows` picks the training images' rows, and validation keeps every label.

Every random mask is a function of ``seed`` alone (a local ``torch.Generator``; the global RNG is
never read or advanced), so a run, its resume and every process of a distributed run agree.

Label-split file format (strict JSON, one object; written by :func:`write_label_split`)::

    {
      "format": "unirep-label-split/1",
      "protocol": "one-label",
      "seed": 0,
      "tasks": ["semantic", "depth", "normal"],
      "image_ids": ["0001", "0002"],
      "labels": [[1, 0, 0], [0, 0, 1]]
    }

- ``format``: always ``"unirep-label-split/1"``.
- ``protocol``: how the mask was made (free text, usually a :data:`PROTOCOLS` name).
- ``seed``: the seed that made it, or null (e.g. a split imported from MTPSL).
- ``tasks``: the column names, each once.
- ``image_ids``: one id (string or integer) per row: the training images' ids in dataset order
  (a run writes their file indices).
- ``labels``: N rows of T integers 0/1, columns in ``tasks`` order; 1 = labelled. N is the number
  of training images, or of images in the whole training folder (file order; see
  :func:`split_rows`).

A run's ``label_split.json`` also records where its training images come from (optional keys,
informative: a reader checks their types and otherwise ignores them)::

      "folder_images": 795,
      "validation_images": [3, 17, 40],
      "source": {"file": "/mtpsl/nyuv2_settings/onelabel.pth", "rows": 795, "row_of": "folder"}

- ``folder_images``: images in the training folder before the validation images are carved out.
- ``validation_images``: the folder indices carved out for validation (fully labelled, not in
  this split); empty when validation has a folder of its own.
- ``source`` (protocol ``file`` only): the split file the labels were read from, its number of
  rows, and ``row_of``: ``"folder"`` when row ``r`` labels image ``r`` of the training folder
  (the rows of validation images were not used), ``"training"`` when row ``i`` labels training
  image ``i`` (see :func:`split_rows`).

``format``, ``tasks`` and ``labels`` are required; ``protocol``, ``seed``, ``image_ids``,
``folder_images``, ``validation_images`` and ``source`` are optional on read; no other key is
allowed. The file's task order may differ from the run's: the columns are reordered to the run's
tasks, and every run task must be in the file and vice versa.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from unirep.errors import ConfigError, DataError
from unirep.io import atomic_write_json

PROTOCOLS = ("full", "one-label", "random-labels", "fraction", "file")
SPLIT_FORMAT = "unirep-label-split/1"
# Column order of MTPSL's shipped settings files (``labels_weights``), per dataset.
MTPSL_TASK_ORDER: dict[str, tuple[str, ...]] = {
    "nyuv2": ("semantic", "depth", "normal"),
    "cityscapes": ("semantic", "depth"),
}
_REQUIRED_KEYS = ("format", "tasks", "labels")
_OPTIONAL_KEYS = (
    "protocol",
    "seed",
    "image_ids",
    "folder_images",
    "validation_images",
    "source",
)
_SOURCE_KEYS = ("file", "rows", "row_of")
ROW_OF = ("folder", "training")  # what a split file's row indexes (``source.row_of``)
#: The config keys that decide which images of the training folder train (the rest validate).
CARVE_KEYS = "dense.val_fraction / dense.val_folder"


def _check_tasks(tasks: Sequence[str], what: str = "tasks") -> list[str]:
    tasks = list(tasks)
    if not tasks:
        raise ConfigError(f"{what} is empty; a label mask needs at least one task")
    if not all(isinstance(t, str) and t for t in tasks):
        raise ConfigError(f"{what} must be non-empty strings, got {tasks!r}")
    if len(set(tasks)) != len(tasks):
        raise ConfigError(f"{what} {tasks!r} name a task more than once")
    return tasks


def _check_fraction(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} must be a number in [0, 1], got {value!r}")
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{where} must be in [0, 1], got {value!r}")
    return float(value)


def _fractions(fraction: float | Mapping[str, float] | None, tasks: list[str]) -> dict[str, float]:
    if fraction is None:
        raise ConfigError("protocol 'fraction' needs fraction (one number or one per task)")
    if isinstance(fraction, Mapping):
        unknown = sorted(set(fraction) - set(tasks))
        missing = [t for t in tasks if t not in fraction]
        if unknown:
            raise ConfigError(f"fraction names unknown task(s) {unknown}; tasks are {tasks}")
        if missing:
            raise ConfigError(f"fraction has no value for task(s) {missing}; tasks are {tasks}")
        return {t: _check_fraction(fraction[t], f"fraction[{t!r}]") for t in tasks}
    value = _check_fraction(fraction, "fraction")
    return dict.fromkeys(tasks, value)


def make_label_mask(
    protocol: str,
    num_images: int,
    tasks: list[str],
    seed: int,
    fraction: float | dict[str, float] | None = None,
) -> torch.Tensor:
    """The label mask of ``protocol`` over ``num_images`` images: bool ``[N, T]``, columns = tasks.

    Reproducible from ``seed`` alone (a local generator; global RNG state is untouched).

    - ``full``: all True.
    - ``one-label``: exactly one True per row; task counts differ by at most one (which tasks get
      the ``N mod T`` extra images is seeded too); images are assigned in a seeded random order.
    - ``random-labels``: each row uniform over the ``2^T − 2`` subsets that are neither empty nor
      full (rejection sampling from fair coin flips); needs ``T ≥ 2``.
    - ``fraction``: column ``t`` has exactly ``round(f_t · N)`` True entries (Python's ``round``,
      halves to even), chosen independently per task; ``fraction`` is one number for every task
      or a dict with exactly one number per task, each in [0, 1]. An image may get no label.

    ``fraction`` is refused for every other protocol (it would do nothing), and ``file`` is refused
    here: its mask comes from :func:`read_label_split` or :func:`import_mtpsl`.
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"label protocol {protocol!r} is unknown; known: {', '.join(PROTOCOLS)}")
    if protocol == "file":
        raise ConfigError(
            "label protocol 'file' reads its mask from a label-split file "
            "(read_label_split or import_mtpsl), not from a seed"
        )
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 0:
        raise ConfigError(f"num_images must be a non-negative integer, got {num_images!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    tasks = _check_tasks(tasks)
    if protocol != "fraction" and fraction is not None:
        raise ConfigError(f"fraction is only used by protocol 'fraction', not {protocol!r}")

    n, t = num_images, len(tasks)
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, t, dtype=torch.bool)
    if protocol == "full":
        mask.fill_(True)
    elif protocol == "one-label":
        counts = torch.full((t,), n // t, dtype=torch.long)
        counts[torch.randperm(t, generator=gen)[: n % t]] += 1
        assigned = torch.repeat_interleave(torch.arange(t), counts)
        assigned = assigned[torch.randperm(n, generator=gen)]
        mask[torch.arange(n), assigned] = True
    elif protocol == "random-labels":
        if t < 2:
            raise ConfigError(
                f"protocol 'random-labels' needs at least 2 tasks (a subset that is neither "
                f"empty nor full); got {tasks}"
            )
        mask = torch.rand(n, t, generator=gen) < 0.5
        bad = _empty_or_full(mask)
        while bool(bad.any()):  # a row is redrawn with probability 2 / 2^T: ends quickly
            mask[bad] = torch.rand(int(bad.sum()), t, generator=gen) < 0.5
            bad = _empty_or_full(mask)
    else:  # fraction
        for j, f in enumerate(_fractions(fraction, tasks).values()):
            mask[torch.randperm(n, generator=gen)[: round(f * n)], j] = True
    return mask


def _empty_or_full(mask: torch.Tensor) -> torch.Tensor:
    """Rows ``[N]`` of a bool ``[N, T]`` mask with no True or no False entry."""
    labels = mask.sum(dim=1)
    return (labels == 0) | (labels == mask.shape[1])


def _check_mask(mask: torch.Tensor, tasks: list[str]) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(f"a label mask is a 2-D tensor [N, T], got {_shape_of(mask)}")
    if mask.shape[1] != len(tasks):
        raise ValueError(f"label mask has {mask.shape[1]} columns but {len(tasks)} tasks {tasks}")
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("label mask values must be 0/1 (or bool)")
        mask = mask != 0
    return mask


def _shape_of(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"


def _json_id(image_id: Any) -> str | int:
    if isinstance(image_id, str):
        return image_id
    if not isinstance(image_id, bool):
        try:
            if int(image_id) == image_id:  # Python and numpy integers
                return int(image_id)
        except (TypeError, ValueError):
            pass
    raise ValueError(f"image ids must be strings or integers, got {image_id!r}")


def write_label_split(
    path: str | Path,
    mask: torch.Tensor,
    tasks: list[str],
    image_ids: Sequence[str | int] | None,
    protocol: str,
    seed: int | None,
    folder_images: int | None = None,
    validation_images: Sequence[int] | None = None,
    source: Mapping[str, Any] | None = None,
) -> None:
    """Atomically write ``mask`` (bool or 0/1 ``[N, T]``, columns = ``tasks``) as a label split.

    ``image_ids``: the N training images' ids in dataset order (strings or integers), or None to
    leave them out. ``protocol`` and ``seed`` record how the mask was made (``seed`` None when it
    was not drawn from one). ``folder_images``, ``validation_images`` and ``source`` (``{"file",
    "rows", "row_of"}``) record where the training images and their rows came from; each is left
    out when None. The format is in this module's docstring.
    """
    tasks = _check_tasks(tasks)
    mask = _check_mask(mask, tasks)
    if not isinstance(protocol, str) or not protocol:
        raise ValueError(f"protocol must be a non-empty string, got {protocol!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")
    data: dict[str, Any] = {
        "format": SPLIT_FORMAT,
        "protocol": protocol,
        "seed": seed,
        "tasks": tasks,
    }
    if image_ids is not None:
        ids = [_json_id(i) for i in image_ids]
        if len(ids) != mask.shape[0]:
            raise ValueError(f"{len(ids)} image ids for a mask of {mask.shape[0]} images")
        if len(set(ids)) != len(ids):
            raise ValueError("image ids are not unique")
        data["image_ids"] = ids
    if folder_images is not None:
        if _bad_count(folder_images) or folder_images < mask.shape[0]:
            raise ValueError(
                f"folder_images must be an integer >= the {mask.shape[0]} images, "
                f"got {folder_images!r}"
            )
        data["folder_images"] = folder_images
    if validation_images is not None:
        held_out = [_json_id(i) for i in validation_images]
        if not all(isinstance(i, int) and i >= 0 for i in held_out):
            raise ValueError(f"validation_images must be folder indices, got {held_out!r}")
        data["validation_images"] = held_out
    if source is not None:
        problem = _source_problem(source)
        if problem:
            raise ValueError(f"source {problem}")
        data["source"] = {k: source[k] for k in _SOURCE_KEYS}
    data["labels"] = mask.to(torch.int64).tolist()
    atomic_write_json(Path(path), data)


def _bad_count(value: Any) -> bool:
    return isinstance(value, bool) or not isinstance(value, int) or value < 0


def _source_problem(source: Any) -> str | None:
    """What is wrong with a ``source`` record (None: nothing)."""
    if not isinstance(source, Mapping) or sorted(source) != sorted(_SOURCE_KEYS):
        keys = sorted(source) if isinstance(source, Mapping) else _jtype(source)
        return f"must be an object with the keys {list(_SOURCE_KEYS)}, got {_short(keys)}"
    if not isinstance(source["file"], str) or _bad_count(source["rows"]):
        return f"'file' must be a string and 'rows' a count, got {_short(dict(source))}"
    if source["row_of"] not in ROW_OF:
        return f"'row_of' is {_short(source['row_of'])}, expected one of {list(ROW_OF)}"
    return None


def split_rows(
    num_rows: int, folder_indices: Sequence[int], folder_images: int, name: str
) -> list[int]:
    """Which row of a split file with ``num_rows`` rows labels each training image.

    ``folder_indices[i]`` is training image ``i``'s index (file order) in the training folder,
    which holds ``folder_images`` images: the run may carve its validation images from that
    folder (``dense.val_fraction``) and leave out unreadable ones. Two layouts are accepted:

    - one row per training image, in dataset order (``num_rows == len(folder_indices)``; what a
      run's ``label_split.json`` holds): training image ``i`` gets row ``i``;
    - one row per image of the whole training folder, in file order (``num_rows ==
      folder_images``; what a published split holds, e.g. MTPSL's ``labels_weights``: 795 rows
      for NYUv2, 2975 for Cityscapes): training image ``i`` gets row ``folder_indices[i]``. The
      rows of the images that do not train (validation) are not used: validation keeps every
      label.

    Returns ``rows``, ``rows[i]`` the row of training image ``i`` (row ``i`` when the two counts
    agree). Raises :class:`DataError` for any other row count: one line starting with ``name``
    (the file), naming both accepted counts and :data:`CARVE_KEYS`.
    """
    indices = [int(i) for i in folder_indices]
    if indices != sorted(set(indices)) or (indices and not 0 <= indices[-1] < folder_images):
        raise ValueError(
            f"folder_indices must be distinct increasing indices below folder_images "
            f"{folder_images}, got {_short(indices)}"
        )
    rows = _rows(num_rows, indices, folder_images)
    if rows is None:
        raise DataError(f"{name}: {_row_count_problem(num_rows, len(indices), folder_images)}")
    return rows


def _rows(num_rows: int, indices: Sequence[int], folder_images: int | None) -> list[int] | None:
    """:func:`split_rows`' answer, None for a row count it refuses."""
    if num_rows == len(indices):
        return list(range(num_rows))
    if folder_images is not None and num_rows == folder_images:
        return list(indices)
    return None


def _row_count_problem(num_rows: int, num_images: int, folder_images: int | None) -> str:
    problem = f"has {num_rows} label rows but the training split has {num_images} images"
    if folder_images is None:
        return problem
    if folder_images == num_images:
        return (
            f"{problem}, the whole training folder (one row per image, in file order); "
            f"{CARVE_KEYS} decide which images train"
        )
    return (
        f"{problem} of the training folder's {folder_images}: give one row per training image "
        f"({num_images}) or one per image of the training folder in file order ({folder_images}, "
        f"the rows of the {folder_images - num_images} images that do not train are left out); "
        f"{CARVE_KEYS} decide which images train"
    )


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_label_split(
    path: str | Path,
    tasks: list[str],
    num_images: int,
    image_ids: Sequence[str | int] | None = None,
    require_label: bool = False,
    folder_indices: Sequence[int] | None = None,
    folder_images: int | None = None,
) -> torch.Tensor:
    """Read a label-split file as a bool mask ``[num_images, len(tasks)]``, columns = ``tasks``.

    The file's columns are reordered to ``tasks``. Its rows are the ``num_images`` training
    images in dataset order or, when ``folder_indices`` (each training image's index in its
    folder) and ``folder_images`` (the folder's size) are given, the images of the whole training
    folder in file order (see :func:`split_rows`; the other images' rows are checked, not used).
    When the file holds image ids (one per row), those of the rows used must match ``image_ids``
    exactly (same ids, same order) if given. ``require_label=True`` refuses a training image with
    no label: pass it for the ``one-label`` and ``random-labels`` semantics (every image
    contributes to training); leave it False for ``fraction``-style splits, where an unlabelled
    image is expected.

    Raises :class:`DataError`, one line naming the file and the problem, for: a missing file,
    invalid JSON, a wrong or missing format tag, an unknown key, a run task absent from the file,
    a file task unknown to the run, a duplicated task, a row count other than those accepted, a
    row of the wrong length, a value other than the integers 0/1, mismatching image ids, a
    malformed record key, and (with ``require_label``) an image with no label.
    """
    tasks = _check_tasks(tasks)
    path = Path(path)
    if (folder_indices is None) != (folder_images is None):
        raise ValueError("folder_indices and folder_images go together")
    indices = list(range(num_images)) if folder_indices is None else list(folder_indices)
    if len(indices) != num_images:
        raise ValueError(f"{len(indices)} folder indices given for {num_images} images")

    def fail(problem: str) -> DataError:
        return DataError(f"label split {str(path)!r}: {problem}")

    data = _split_object(path, fail)
    file_tasks = _split_tasks(data["tasks"], tasks, fail)
    labels = data["labels"]
    if not isinstance(labels, list):
        raise fail(f"'labels' must be a list of rows, got a {_jtype(labels)}")
    if folder_images is None:
        rows = _rows(len(labels), indices, None)
        if rows is None:
            raise fail(_row_count_problem(len(labels), num_images, None))
    else:
        rows = split_rows(len(labels), indices, folder_images, f"label split {str(path)!r}")
    _split_labels(labels, file_tasks, fail)
    if "image_ids" in data:
        _check_split_ids(data["image_ids"], image_ids, rows, len(labels), fail)
    file_mask = torch.tensor(labels, dtype=torch.bool).reshape(len(labels), len(file_tasks))
    mask = file_mask[rows][:, [file_tasks.index(t) for t in tasks]].contiguous()
    if require_label:
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            first = empty[0]
            name = f" (id {_short(data['image_ids'][rows[first]])})" if "image_ids" in data else ""
            raise fail(
                f"{len(empty)} image(s) have no label, first image {first}{name}; "
                "this protocol needs at least one label per image"
            )
    return mask


def _split_object(path: Path, fail: Callable[[str], DataError]) -> dict[str, Any]:
    """The label-split file's JSON object, its format tag and keys checked (``fail(problem)``
    makes the error naming the file)."""
    if not path.is_file():
        raise fail("does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise fail(f"is not valid JSON ({_first_line(err)})") from err
    if not isinstance(data, dict):
        raise fail(f"must hold a JSON object with format {SPLIT_FORMAT!r}, not a {_jtype(data)}")
    if data.get("format") != SPLIT_FORMAT:
        raise fail(f"format is {_short(data.get('format'))}, expected {SPLIT_FORMAT!r}")
    unknown_keys = sorted(set(data) - set(_REQUIRED_KEYS) - set(_OPTIONAL_KEYS))
    if unknown_keys:
        raise fail(f"unknown key(s) {unknown_keys}; allowed: {[*_REQUIRED_KEYS, *_OPTIONAL_KEYS]}")
    missing_keys = [k for k in _REQUIRED_KEYS if k not in data]
    if missing_keys:
        raise fail(f"missing key(s) {missing_keys}")
    if "folder_images" in data and _bad_count(data["folder_images"]):
        raise fail(f"'folder_images' must be a count, got {_short(data['folder_images'])}")
    held_out = data.get("validation_images", [])
    if not isinstance(held_out, list) or any(_bad_count(i) for i in held_out):
        raise fail(f"'validation_images' must be a list of folder indices, got {_short(held_out)}")
    if "source" in data:
        problem = _source_problem(data["source"])
        if problem:
            raise fail(f"'source' {problem}")
    return data


def _split_tasks(file_tasks: Any, tasks: list[str], fail: Callable[[str], DataError]) -> list[str]:
    """The file's ``tasks``, checked: a list of distinct names, the same set as the run's."""
    if not isinstance(file_tasks, list) or not all(isinstance(t, str) for t in file_tasks):
        raise fail(f"'tasks' must be a list of task names, got {_short(file_tasks)}")
    if len(set(file_tasks)) != len(file_tasks):
        raise fail(f"'tasks' {file_tasks} names a task more than once")
    unknown = [t for t in file_tasks if t not in tasks]
    if unknown:
        raise fail(f"unknown task(s) {unknown}; this run's tasks are {tasks}")
    missing = [t for t in tasks if t not in file_tasks]
    if missing:
        raise fail(f"no labels for task(s) {missing} (file tasks {file_tasks})")
    return file_tasks


def _split_labels(
    labels: list[Any], file_tasks: list[str], fail: Callable[[str], DataError]
) -> list[list[int]]:
    """The file's ``labels`` (a list), checked: rows of one 0/1 integer per file task."""
    width = len(file_tasks)
    for i, row in enumerate(labels):
        if not isinstance(row, list) or len(row) != width:
            got = f"{len(row)} values" if isinstance(row, list) else f"a {_jtype(row)}"
            raise fail(f"row {i} has {got}, expected {width} (one per task in {file_tasks})")
        for v in row:
            if type(v) is not int or v not in (0, 1):
                raise fail(f"row {i} holds {_short(v)}; label values must be the integers 0 or 1")
    return labels


def _check_split_ids(
    file_ids: Any,
    image_ids: Sequence[str | int] | None,
    rows: list[int],
    num_rows: int,
    fail: Callable[[str], DataError],
) -> None:
    """Refuse the file's ``image_ids`` unless they are a list of one id per row (``num_rows``)
    whose ids at ``rows`` equal, in order, ``image_ids`` (when given)."""
    if not isinstance(file_ids, list):
        raise fail(f"'image_ids' must be a list, got a {_jtype(file_ids)}")
    if len(file_ids) != num_rows:
        raise fail(f"has {len(file_ids)} image ids but {num_rows} label rows")
    if image_ids is None:
        return
    expected = list(image_ids)
    if len(expected) != len(rows):
        raise ValueError(f"{len(expected)} image ids given for {len(rows)} images")
    for i, want_id in zip(rows, expected, strict=True):
        if file_ids[i] != want_id:
            raise fail(
                f"image id {i} is {_short(file_ids[i])} but the training split's is "
                f"{_short(want_id)}: the split was made for other images or another order"
            )


def _jtype(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def import_mtpsl(path: str | Path, task_order: list[str]) -> torch.Tensor:
    """Read one of MTPSL's shipped settings files as a bool mask ``[N, T]``, columns = task_order.

    The file is a ``torch.save``-d dict with the single key ``'labels_weights'`` holding a
    FloatTensor ``[N, T]`` of 0/1 (``nyuv2_settings/*.pth``: N = 795, T = 3; ``cityscapes_settings/
    onelabel.pth``: N = 2975, T = 2); a file holding the bare tensor is accepted too.
    ``task_order`` names the file's columns (:data:`MTPSL_TASK_ORDER`). Loaded with
    ``weights_only=True``: no code in the file runs. Row ``r`` is image ``r`` of the whole
    training folder (file order): :func:`split_rows` picks the rows of a run's training images.

    Raises :class:`DataError` naming the file for: a missing or unreadable file, a dict without
    that single key, a value that is not a 2-D tensor with ``len(task_order)`` columns and at least
    one row, or a value other than 0/1.
    """
    task_order = _check_tasks(task_order, "task_order")
    path = Path(path)

    def fail(problem: str) -> DataError:
        return DataError(f"MTPSL settings file {str(path)!r}: {problem}")

    if not path.is_file():
        raise fail("does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a file that is not its own
        raise fail(
            f"cannot be loaded with torch.load(weights_only=True) ({_first_line(err)})"
        ) from err
    if isinstance(data, dict):
        if list(data) != ["labels_weights"]:
            raise fail(
                f"expected a dict with the single key 'labels_weights', got keys {list(data)}"
            )
        data = data["labels_weights"]
    if not isinstance(data, torch.Tensor) or data.dim() != 2:
        raise fail(f"'labels_weights' must be a 2-D tensor [N, T], got {_shape_of(data)}")
    if data.shape[1] != len(task_order):
        raise fail(
            f"has {data.shape[1]} columns but task_order names {len(task_order)}: {task_order}"
        )
    if data.shape[0] == 0:
        raise fail("has no rows")
    if data.is_complex() or not bool(((data == 0) | (data == 1)).all()):
        raise fail("values must all be 0 or 1")
    return (data != 0).contiguous()


def describe(mask: torch.Tensor, tasks: list[str]) -> dict[str, Any]:
    """Summary of a bool ``[N, T]`` mask for reports and the saved config (plain Python types).

    Returns ``{"num_images": N, "labels_per_task": {task: count}, "fraction_per_task": {task:
    count / N, 4 decimals}, "labels_per_image": {"k": number of images with k labels, k = 0..T
    as strings, as JSON has them}, "unlabelled_images": number of images with no label}``.
    """
    tasks = _check_tasks(tasks)
    mask = _check_mask(mask, tasks)
    n = mask.shape[0]
    per_task = mask.sum(dim=0).tolist()
    per_image = torch.bincount(mask.sum(dim=1), minlength=len(tasks) + 1).tolist()
    return {
        "num_images": n,
        "labels_per_task": dict(zip(tasks, per_task, strict=True)),
        "fraction_per_task": {
            t: round(c / n, 4) if n else 0.0 for t, c in zip(tasks, per_task, strict=True)
        },
        "labels_per_image": {str(k): c for k, c in enumerate(per_image)},
        "unlabelled_images": per_image[0],
    }
