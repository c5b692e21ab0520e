"""Kill and resume: a run SIGKILLed at any point resumes to the same bytes as an uninterrupted run.

The real script runs in subprocesses (CPU, one process, one thread). ``UNIREP_KILL_AT=list``
makes a reference run print every kill point it passes (:mod:`unirep.faults`); one chained run is
then killed at a series of those points in order (during data generation, a teacher step, a
checkpoint write, a best-weights write, a log append, a teacher save, the baseline, the student,
the export's weights, timm backbone, model card and manifest, the submission and metrics.json),
resumed after each kill, and must end with the reference's teachers, student (its backbone and
card included), ``metrics.json`` and ``results.json`` (timings aside: they are wall clock).
Half-written files are never read, and are gone once the run is resumed.
"""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import TINY

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

# In the order a run reaches them; each is matched (fnmatch) against the reference's kill points.
KILL_POINTS = [
    "generate:*",  # the generated benchmark, half written
    "write:run/config.yaml",  # the run folder, before its config is in place
    "step:teacher-objects:1",  # a teacher, mid-training (no checkpoint yet)
    "log:teacher-objects:2",  # a log row half appended
    "write:teacher-objects/best.safetensors",  # best weights written, not yet moved into place
    "write:.step_000003.tmp/model.safetensors",  # a checkpoint half written
    "write:teacher-objects/step_000003",  # a checkpoint written, not yet renamed
    "write:teacher-objects/done.json",  # the phase record
    "write:objects-*/model.safetensors",  # the cached teacher's weights
    "write:objects-*/teacher.json",  # ... and its manifest
    "step:baseline:3",
    "write:baseline/evaluation_test.json",
    "write:student/best.safetensors",
    "write:student/step_000004",
    "write:student/model.safetensors",  # the export's weights
    "write:backbone/model.safetensors",  # ... its timm backbone
    "write:student/README.md",  # ... its model card
    "write:student/manifest.json",  # ... and its manifest
    "write:run/metrics.json",  # the very last write
]


def _launch(
    cache: Path, out: Path, kill_at: str | None, *extra: str
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("UNIREP_KILL_AT", None)
    if kill_at is not None:
        env["UNIREP_KILL_AT"] = kill_at
    if (out / "run" / "config.yaml").exists():
        extra = (*extra, "resume=true")
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "distill.py"), *TINY,
         f"data.cache_dir={cache}", f"output_dir={out}", "name=run", *extra],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )  # fmt: skip


def _without_seconds(value: Any) -> Any:
    """Drop wall-clock entries (``*seconds*``), which differ between any two runs, and the data
    ``root`` (the two runs use two cache folders)."""
    if isinstance(value, dict):
        return {
            k: _without_seconds(v) for k, v in value.items() if "seconds" not in k and k != "root"
        }
    if isinstance(value, list):
        return [_without_seconds(v) for v in value]
    return value


def _outputs(cache: Path, out: Path) -> dict[str, Any]:
    """What must be identical: weights bytes, manifests and metrics (timings aside)."""
    found: dict[str, Any] = {}
    for path in sorted((cache / "teachers").rglob("*")):
        if path.is_file():
            key = f"teachers/{path.parent.name}/{path.name}"
            found[key] = (
                _without_seconds(json.loads(path.read_text()))
                if path.suffix == ".json"
                else path.read_bytes()
            )
    run = out / "run"
    found["student/model.safetensors"] = (run / "student" / "model.safetensors").read_bytes()
    backbone = run / "student" / "backbone"
    found["student/backbone/model.safetensors"] = (backbone / "model.safetensors").read_bytes()
    found["student/backbone/config.json"] = json.loads((backbone / "config.json").read_text())
    # the card names the run's folders (its data root, the command's output_dir and cache)
    card = (run / "student" / "README.md").read_text()
    found["student/README.md"] = card.replace(str(cache), "<cache>").replace(str(out), "<out>")
    found["student/manifest.json"] = _without_seconds(
        json.loads((run / "student" / "manifest.json").read_text())
    )
    found["results.json"] = (run / "results.json").read_bytes()
    found["metrics.json"] = _without_seconds(json.loads((run / "metrics.json").read_text()))
    return found


def _choose(listing: list[str]) -> list[str]:
    """The kill points, resolved against the reference's listing, in the order it reached them."""
    chosen, at = [], -1
    for pattern in KILL_POINTS:
        if pattern.startswith("log:"):  # log points are not listed; their steps are known
            chosen.append(pattern)
            continue
        hits = [i for i, name in enumerate(listing) if i > at and fnmatch.fnmatch(name, pattern)]
        assert hits, f"{pattern} not reached after {listing[at] if at >= 0 else 'the start'}"
        at = hits[0]
        chosen.append(listing[at])
    return chosen


def test_a_run_killed_anywhere_resumes_to_the_same_bytes(tmp_path: Path) -> None:
    reference = _launch(tmp_path / "cache-a", tmp_path / "a", "list")
    assert reference.returncode == 0, reference.stderr[-3000:]
    listing = [
        line.split(" ", 1)[1]
        for line in reference.stderr.splitlines()
        if line.startswith("failpoint ")
    ]
    chosen = _choose(listing)

    cache, out = tmp_path / "cache-b", tmp_path / "b"
    for point in chosen:
        killed = _launch(cache, out, point)
        assert killed.returncode == -9, (point, killed.returncode, killed.stderr[-3000:])
    final = _launch(cache, out, None)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "Traceback" not in final.stderr

    expected, got = _outputs(tmp_path / "cache-a", tmp_path / "a"), _outputs(cache, out)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == value, key
    leftovers = [
        *out.rglob(".*.tmp"),
        *(cache / "teachers").rglob(".*.tmp"),
        *cache.glob(".*.tmp-*"),
    ]
    assert not leftovers, leftovers
    log = (out / "run" / "logs" / "student.csv").read_text()
    assert log == (tmp_path / "a" / "run" / "logs" / "student.csv").read_text()

    # a finished run is never recomputed nor rewritten: resume=true says so and exits 0
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    again = _launch(cache, out, None)
    assert again.returncode == 0 and "already finished" in again.stdout, again.stderr[-2000:]
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_a_damaged_checkpoint_or_best_weights_are_never_used_silently(tmp_path: Path) -> None:
    """A 1-ulp change in the student's newest checkpoint: the resume says it skips it, resumes
    from the one before and ends with the reference's bytes. A flipped byte in the finished
    student's best weights before the export: refused in one line, exit 1, nothing exported."""
    cache = tmp_path / "cache"
    reference = _launch(cache, tmp_path / "a", None)
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "b"
    killed = _launch(cache, out, "step:student:5")  # checkpoints step_000002 and step_000004
    assert killed.returncode == -9, killed.stderr[-3000:]
    newest = out / "run" / "checkpoints" / "student" / "step_000004"
    weights = load_file(str(newest / "model.safetensors"))
    name = sorted(weights)[0]
    value = weights[name].numpy().copy()
    value.flat[0] = np.nextafter(value.flat[0], np.float32(np.inf), dtype=np.float32)
    save_file({**weights, name: torch.from_numpy(value)}, str(newest / "model.safetensors"))
    resumed = _launch(cache, out, None)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"[student] checkpoint {newest} is damaged (model.safetensors does not match" in (
        resumed.stdout
    )
    assert "resuming from step_000002" in resumed.stdout
    expected, got = _outputs(cache, tmp_path / "a"), _outputs(cache, out)
    for key, value_ in expected.items():
        assert got[key] == value_, key

    out = tmp_path / "c"
    killed = _launch(cache, out, "write:student/model.safetensors")  # the student's export
    assert killed.returncode == -9, killed.stderr[-3000:]
    best = out / "run" / "checkpoints" / "student" / "best.safetensors"
    data = bytearray(best.read_bytes())
    data[-5] ^= 0x04
    best.write_bytes(bytes(data))
    refused = _launch(cache, out, None)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    last = refused.stderr.strip().splitlines()[-1]
    assert str(best) in last and "overwrite=true" in last
    assert not (out / "run" / "student" / "model.safetensors").exists()
