"""Peak memory and step time of the gradient methods on their two paths, at T = 3 and T = 10.

The Jacobian path keeps a ``[T + 1, P]`` per-task gradient buffer; the Gramian path
(:mod:`unirep.weighting.gramian`, torchjd's autogram engine) computes the ``[T, T]`` Gramian
without it. Both run on one synthetic T-task model (no data, no config): an MLP trunk
(``width`` → ``width``, ``depth`` layers, tanh; ``P ≈ depth · width²`` shared parameters) and one
linear head per task, squared-error losses on random targets, plain SGD. Each (method, T, path)
cell runs in a fresh process (``spawn``), so that its peak is its own: CUDA
``max_memory_allocated`` above what was allocated before the step, or on CPU the process's peak
resident set above the resident set before the step (Linux ``VmHWM`` after
``/proc/self/clear_refs``).
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
import warnings
from typing import Any

import torch
from torch import Tensor, nn

GRAMIAN_METHODS = ("mgda", "pcgrad", "cagrad", "imtl", "nash_mtl", "aligned_mtl", "upgrad",
                   "dualproj")  # fmt: skip
"""Methods timed by default (those registered whose weights depend on the Gramian only)."""
TASK_COUNTS = (3, 10)


class SyntheticTasks(nn.Module):
    """``[B, width]`` → trunk (``depth`` × (linear, tanh)) → ``T`` linear heads ``[B]``."""

    def __init__(self, tasks: int, width: int = 512, depth: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.Tanh()]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList([nn.Linear(width, 1) for _ in range(tasks)])

    def forward(self, x: Tensor) -> list[Tensor]:
        z = self.trunk(x)
        return [head(z).squeeze(-1) for head in self.heads]


class _OneProcess:
    """What :meth:`~unirep.weighting.GradientWeighting.backward` reads of an accelerator."""

    num_processes = 1
    gradient_accumulation_steps = 1
    sync_gradients = True
    scaler = None

    def backward(self, loss: Tensor) -> None:
        loss.backward()


def _weighting_kwargs(method: str) -> dict[str, Any]:
    return {"mode": "g"} if method == "imtl" else {}


def measure_cell(
    method: str, tasks: int, path: str, steps: int = 5, warmup: int = 2, device: str = "cpu",
    width: int = 512, depth: int = 4, batch: int = 64,
) -> dict[str, Any]:  # fmt: skip
    """One cell in this process: ``{"ms": median step ms, "peak_mib": step peak MiB}``. Two
    more warm-up steps than asked: ``path="auto"`` / ``"gramian"`` run their first step on the
    Jacobian path and their second on both (the equality check)."""
    from unirep.experiments.benchmark import _peak, _reset_peak
    from unirep.losses.bundle import LossBundle
    from unirep.weighting import build_weighting

    torch.manual_seed(0)
    dev = torch.device(device)
    model = SyntheticTasks(tasks, width, depth).to(dev)
    names = [f"t{i}" for i in range(tasks)]
    weighting = build_weighting(method, names, path=path, **_weighting_kwargs(method))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    shared = list(model.trunk.parameters())
    accelerator = _OneProcess()
    x = torch.randn(batch, width, device=dev)
    targets = torch.randn(tasks, batch, device=dev)
    times, peaks = [], []
    warmup += 2
    for step in range(warmup + steps):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else _rss_mib()
        _reset_peak(dev)
        start = time.perf_counter()
        engine = weighting.gramian_engine(model.trunk)  # type: ignore[operator]
        outputs = model(x)
        if engine is not None:
            engine.release()
        losses = {n: ((o - y) ** 2).mean() for n, o, y in zip(names, outputs, targets, strict=True)}
        bundle = LossBundle(supervised=losses, gramian_engine=engine)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            weighting.backward(bundle, shared, accelerator)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del bundle, losses, outputs, engine
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - start
        peak, _ = _peak(dev)
        if step >= warmup:
            times.append(seconds)
            peaks.append(peak - (before / 2**20 if dev.type == "cuda" else before))
    return {"ms": 1000 * statistics.median(times), "peak_mib": max(peaks),
            "route": getattr(weighting, "_route", None)}  # fmt: skip


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _child(queue: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    try:
        torch.set_num_threads(kwargs.pop("threads", torch.get_num_threads()))
        queue.put(("ok", measure_cell(*args, **kwargs)))
    except BaseException as err:  # reported to the parent
        queue.put(("error", f"{type(err).__name__}: {str(err).splitlines()[0]}"))


def _spawned(*args: Any, **kwargs: Any) -> dict[str, Any] | str:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, args, kwargs))
    proc.start()
    status, value = queue.get()
    proc.join()
    return value if status == "ok" else str(value)


def path_costs(
    methods: list[str] | None = None, task_counts: tuple[int, ...] = TASK_COUNTS,
    steps: int = 5, warmup: int = 2, device: str | None = None,
) -> dict[str, dict[int, dict[str, dict[str, Any] | str]]]:  # fmt: skip
    """``{method: {T: {"jacobian": cell, "gramian": cell}}}`` (a cell is
    :func:`measure_cell`'s dict, or the one-line reason it did not run); methods not registered
    are left out."""
    from unirep.weighting import WEIGHTINGS

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    wanted = [m for m in (methods or GRAMIAN_METHODS) if m in WEIGHTINGS]
    threads = torch.get_num_threads()
    return {
        method: {
            t: {
                path: _spawned(method, t, path, steps, warmup, device, threads=threads)
                for path in ("jacobian", "gramian")
            }
            for t in task_counts
        }
        for method in wanted
    }


def format_path_costs(rows: dict[str, dict[int, dict[str, dict[str, Any] | str]]]) -> str:
    """Markdown: per method and T, the step ms and peak MiB of both paths and their ratios."""
    lines = [
        "| method | T | Jacobian ms | Gramian ms | Jacobian peak MiB | Gramian peak MiB | "
        "Gramian / Jacobian peak |",
        "|:---|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for method, by_t in rows.items():
        for t, cells in by_t.items():
            jac, gram = cells["jacobian"], cells["gramian"]
            if isinstance(jac, str) or isinstance(gram, str):
                notes.append(f"{method} T={t}: {jac if isinstance(jac, str) else gram}")
                continue
            # below 1 MiB the peak is the allocator's noise: no ratio
            ratio = gram["peak_mib"] / jac["peak_mib"] if jac["peak_mib"] >= 1 else None
            lines.append(
                f"| {method} | {t} | {jac['ms']:.1f} | {gram['ms']:.1f} | "
                f"{jac['peak_mib']:.1f} | {gram['peak_mib']:.1f} | "
                f"{'—' if ratio is None else f'{ratio:.2f}'} |"
            )
    return "\n".join(lines + ([""] if notes else []) + notes)
