"""The Python API of an exported student: ``unirep.load_student(folder)`` → :class:`Student`.

    import unirep

    student = unirep.load_student("runs/<run>/student")   # manifest and weights hash checked
    student.predict(images)                    # {task: predictions}, preprocessed as trained
    student.features(images, stream="digits")  # the shared representation
    student.evaluate("test")                   # {task: {metric: value}} over the whole split

Images are PIL images, ``uint8`` arrays ``[H, W, 3]`` / ``[B, H, W, 3]``, or tensors
``[3, H, W]`` / ``[B, 3, H, W]`` (``uint8``, or float RGB in [0, 1]), alone or in a list; each
stream's preprocessing is the one its manifest records, applied by the datasets' own transforms
(:func:`unirep.data.classification.transforms.build_transform` at evaluation for a classification
stream: resize, centre crop, normalise; :class:`unirep.data.dense.mtan.DenseImageTransform` for a
dense one: [0, 1] floats at the training size). Tensors already preprocessed (a unirep dataset's
``"image"``) pass with ``preprocessed=True``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

import unirep.layout as layout
from unirep.config.schema import Config
from unirep.data.classification.transforms import build_transform
from unirep.data.dense.mtan import DenseImageTransform
from unirep.errors import MissingFileError, StudentError
from unirep.pipeline.export import load_student as load_network
from unirep.pipeline.export import student_preprocessing, student_tasks
from unirep.tasks import Task
from unirep.training.evaluator import Results

Images = Any
"""What :meth:`Student.predict` and :meth:`Student.features` take (see the module docstring)."""

RUN_CONFIG = layout.CONFIG  # beside student/ in a run folder: the config that trained it


def inference_transform(preprocessing: dict[str, Any]) -> Callable[[Any], Tensor]:
    """The evaluation transform a stream's recorded ``preprocessing`` describes: one image
    (PIL, or a tensor ``[3, H, W]``) → float32 ``[3, h, w]``."""
    if "crop" in preprocessing:  # a classification stream (Decathlon, Hugging Face domains)
        return build_transform(
            train=False,
            resize=preprocessing["resize"],
            crop=preprocessing["crop"],
            mean=preprocessing["mean"],
            std=preprocessing["std"],
            flip=False,
            square_resize=bool(preprocessing.get("square_resize", False)),
        )
    return DenseImageTransform(preprocessing.get("image_size"))


def _one_image(image: Any) -> Any:
    """A single image as the transforms take it: a PIL image (RGB) or a tensor ``[3, H, W]``."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"an image array must be [H, W, 3], got shape {list(image.shape)}")
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"an image tensor must be [3, H, W], got shape {list(image.shape)}")
        return image.detach().cpu()
    raise TypeError(
        f"cannot read a {type(image).__name__} as an image; give PIL images, uint8 arrays "
        "[H, W, 3] or tensors [3, H, W]"
    )


def as_image_list(images: Images) -> list[Any]:
    """``images`` (one image, a batch array ``[B, H, W, 3]`` / tensor ``[B, 3, H, W]``, or a
    sequence of images) as a list of single images."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return [_one_image(x) for x in images]
    if isinstance(images, Tensor) and images.dim() == 4:
        return [_one_image(x) for x in images]
    if isinstance(images, Sequence) and not isinstance(images, str | bytes):
        return [_one_image(x) for x in images]
    return [_one_image(images)]


class Student(nn.Module):
    """An exported student, ready to use: the network, its tasks and its preprocessing.

    Attributes:
        net: the student network (``forward({stream: [B, 3, h, w]}) -> {task: {"pred", ...}}``).
        manifest: its ``manifest.json`` (architecture, tasks, preprocessing, teachers, hashes).
        tasks: ``{task: Task}`` it predicts, in the manifest's order.
        preprocessing: ``{stream: the recorded preprocessing}``.
        folder: where it was loaded from (None for one built in memory).
    """

    def __init__(
        self, net: nn.Module, manifest: dict[str, Any], folder: Path | None = None
    ) -> None:
        super().__init__()
        self.net = net
        self.manifest = manifest
        self.folder = folder
        self.tasks: dict[str, Task] = student_tasks(manifest)
        self.preprocessing: dict[str, dict[str, Any]] = student_preprocessing(manifest)
        self._transforms = {s: inference_transform(p) for s, p in self.preprocessing.items()}

    @property
    def streams(self) -> list[str]:
        """The input streams, in task order (one per Decathlon domain; one for a dense student)."""
        return list(dict.fromkeys(t.stream for t in self.tasks.values()))

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
        """The network's raw outputs for preprocessed ``{stream: images [B, 3, h, w]}``:
        ``{task: {"pred": logits [B, K] / maps [B, K, h, w], "features": ..., ...}}``."""
        return self.net(inputs)

    def _stream(self, stream: str | None) -> str:
        if stream is None:
            if len(self.streams) > 1:
                raise ValueError(
                    f"this student reads several streams ({', '.join(self.streams)}): name one, "
                    "e.g. stream=" + repr(self.streams[0])
                )
            return self.streams[0]
        if stream not in self.streams:
            raise KeyError(f"unknown stream {stream!r}; streams: {', '.join(self.streams)}")
        return stream

    def preprocess(self, images: Images, stream: str | None = None) -> Tensor:
        """``images`` preprocessed as ``stream``'s were in training (its manifest's record):
        float32 ``[B, 3, h, w]`` on the student's device."""
        transform = self._transforms[self._stream(stream)]
        batch = [transform(x).as_subclass(Tensor) for x in as_image_list(images)]
        return torch.stack(batch).to(self.device)

    def _inputs(self, images: Images, stream: str, preprocessed: bool) -> Tensor:
        if not preprocessed:
            return self.preprocess(images, stream)
        x = torch.as_tensor(images)
        return (x[None] if x.dim() == 3 else x).to(self.device, torch.float32)

    @torch.no_grad()
    def predict(
        self, images: Images, task: str | None = None, *, preprocessed: bool = False
    ) -> Tensor | dict[str, Tensor]:
        """Predictions for ``images``: one task's (``task``), else ``{task: ...}`` for every task.

        Per image, as the task's kind defines them: a class index ``[B]`` (classification), a
        label map ``[B, h, w]`` (segmentation), depth ``[B, 1, h, w]``, unit normals
        ``[B, 3, h, w]``; ``h × w`` is the preprocessed size. Each task's stream preprocesses
        the images its own way (a multi-domain student normalises them per domain).
        """
        names = list(self.tasks) if task is None else [task]
        unknown = [n for n in names if n not in self.tasks]
        if unknown:
            raise KeyError(f"unknown task {unknown[0]!r}; tasks: {', '.join(self.tasks)}")
        was_training = self.training
        self.eval()
        out: dict[str, Tensor] = {}
        for stream in dict.fromkeys(self.tasks[n].stream for n in names):
            outputs = self.net({stream: self._inputs(images, stream, preprocessed)})
            for n in names:
                if self.tasks[n].stream == stream:
                    out[n] = self.tasks[n].predictions(outputs[n]["pred"].float())
        self.train(was_training)
        return out[task] if task is not None else out

    @torch.no_grad()
    def features(
        self, images: Images, stream: str | None = None, *, preprocessed: bool = False
    ) -> Tensor:
        """The shared representation of ``images`` read as ``stream`` (needed when the student
        has several): a classification student's pooled backbone features ``[B, C]``; a dense
        student's last encoder stage ``[B, C_last, H_last, W_last]`` (SegNet: ``[B, C_5, h/32,
        w/32]``). The exported ``backbone/`` gives the same in timm (``forward`` and
        ``forward_features`` respectively; see :mod:`unirep.pipeline.export`)."""
        stream = self._stream(stream)
        was_training = self.training
        self.eval()
        x = self._inputs(images, stream, preprocessed)
        feats = self.net.representation({stream: x})[stream]  # type: ignore[operator]
        self.train(was_training)
        return feats

    def default_config(self) -> str:
        """The config :meth:`evaluate` reads by default: the training run's ``config.yaml``
        beside this ``student/`` folder, else the preset the manifest names."""
        if self.folder is not None and (self.folder.parent / RUN_CONFIG).is_file():
            return str(self.folder.parent / RUN_CONFIG)
        return str(self.manifest["preset"])

    def evaluate(
        self,
        split: str = "test",
        config: Config | str | Path | None = None,
        overrides: Sequence[str] = (),
        *,
        data_root: str | Path | None = None,
    ) -> Results:
        """Metrics over the whole ``split``: ``{task: {metric: value}}`` (None where the split
        has no labels), through :class:`unirep.training.evaluator.Evaluator` as a run measures them.

        The data is ``config``'s (a :class:`Config`, preset name or YAML path; default
        :meth:`default_config`) with ``overrides`` and, when given, ``data.root=data_root``;
        the images are preprocessed as this student's manifest records. Runs on the device
        ``make_accelerator`` picks (CUDA when present); the student comes back to its device.
        """
        from unirep.pipeline.rundir import make_accelerator
        from unirep.pipeline.stage_two import matching_tasks, resolve_data
        from unirep.pipeline.validate import resolve_config
        from unirep.training.evaluator import Evaluator

        extra = [f"split={split}"] + ([f"data.root={data_root}"] if data_root else [])
        cfg = resolve_config(self.default_config() if config is None else config,
                             [*overrides, *extra])  # fmt: skip
        accelerator = make_accelerator(cfg)
        data = resolve_data(cfg, accelerator)
        for note in data.use_preprocessing(self.preprocessing):
            accelerator.print(note)
        tasks = matching_tasks(self.tasks, data.tasks(), str(self.folder or "in memory"))
        device = self.device
        self.net.to(accelerator.device)
        evaluator = Evaluator(accelerator, cfg.data.eval_batch_size, cfg.data.num_workers)
        try:
            return evaluator.evaluate(self.net, split, data.datasets(split), tasks)
        finally:
            self.net.to(device)


def load_student(folder: str | Path, map_location: str | torch.device = "cpu") -> Student:
    """An exported student (a ``student/`` folder, or the run folder holding it) as a
    :class:`Student` in eval mode on ``map_location``: the weights' sha256 is checked against the
    manifest and loaded strictly into the architecture it records. Any export format loads.

    A folder that is missing, or a student whose manifest or weights are damaged, whose format or
    architecture this version does not read, or whose manifest's tasks were edited, is a
    one-line :class:`~unirep.errors.UnirepError` naming the file and what to do."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise MissingFileError(
            f"student folder {str(folder)!r} does not exist or is not a folder; give an exported "
            "student (a run folder, or its student/ folder)"
        )
    if layout.student_dir(folder).is_dir() and not (folder / layout.STUDENT_MANIFEST).is_file():
        folder = layout.student_dir(folder)
    net, manifest = load_network(folder)  # manifest, hash, format, architecture, tasks checked
    try:
        student = Student(net, manifest, folder)
    except (KeyError, TypeError, ValueError) as err:  # a preprocessing record it cannot use
        raise StudentError(
            f"student manifest {str(folder / layout.STUDENT_MANIFEST)!r} has a preprocessing "
            f"record unirep cannot use ({type(err).__name__}: {err}); copy the whole student "
            "folder again (or rerun its run to export it again)"
        ) from None
    return student.to(map_location).eval()
