"""The teacher-output cache (FKD): pre-drawn augmentations, the teachers' outputs on them.

- A sample read through :class:`SeededDraws` is a function of ``(seed, index, draw)`` (the same
  image and ``aug`` record again; another draw another crop), for the Decathlon and the dense
  readers, and the RNG outside is left as it was.
- :class:`DrawBatchSampler` reads the step's indices of the plain sampler, with draws that depend
  only on the seed and the step (a resume reads the same).
- The cached outputs equal the teachers' online outputs on the same draws (float32 cache: atol
  1e-5; float16: fp16 rounding), and a student step on the cache equals the step with the
  teachers run online on those draws (float32 cache), for dense and classification runs.
- The cache is keyed by what determines it (another teacher → another folder), written once, then
  only read; a dataset whose augmentation ignores torch's RNG is refused in one line.
- A damaged cache (a finite change in an array, a truncated array, another format version) is
  found by its manifest's hashes when opened, said in one line and rebuilt in place.
- A whole tiny run with the cache finishes, records the cache in ``metrics.json``, and a second
  run with the same teachers finds the cache and trains the same student.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import Dataset

from tests.conftest import tiny_config, tiny_dense_config
from unirep.data.sampling import DrawBatchSampler, StepBatchSampler
from unirep.errors import ConfigError, DataError
from unirep.experiments.benchmark import random_teachers
from unirep.pipeline.stage_two import resolve_data, student_phase
from unirep.pipeline.validate import load_config
from unirep.teachers.output_cache import SeededDraws
from unirep.teachers.provider import provide_teachers, teacher_outputs
from unirep.training.trainer import setup, train_step

pytestmark = pytest.mark.usefixtures("one_thread")


def _phase(cfg, tmp_path: Path, name: str = "run"):
    """The student's phase with its teachers online (the cache off, whatever ``cfg`` says)."""
    accelerator = Accelerator(cpu=True)
    data = resolve_data(cfg, accelerator)
    tasks = data.tasks()
    reference = {n: {t.main_metric: 1.0} for n, t in tasks.items()}
    teachers = random_teachers(cfg, data)
    online = copy.deepcopy(cfg)
    online.teachers.output_cache.draws = 0
    work = tmp_path / name
    phase, _ = student_phase(online, accelerator, "student", data, tasks, work, teachers,
                             reference, True)  # fmt: skip
    return accelerator, data, teachers, phase


def with_output_cache(phase, cfg, accelerator, data, teachers):
    """``phase`` reading the teachers' outputs from the cache of ``cfg``, and the record."""
    provision = provide_teachers(cfg, accelerator, data, teachers, phase.tasks, phase.train_sets,
                                 phase.seed)  # fmt: skip
    cached = dataclasses.replace(phase, train_sets=provision.train_sets,
                                 teachers=provision.outputs, draws=provision.draws)  # fmt: skip
    return cached, provision.cache


@pytest.mark.parametrize("kind", ["dense", "classification"])
def test_a_draw_is_a_function_of_seed_index_and_draw(kind: str, tiny_cache: Path, tmp_path):
    make = tiny_dense_config if kind == "dense" else tiny_config
    cfg = make(tiny_cache, tmp_path)
    _, _, _, phase = _phase(cfg, tmp_path)
    dataset = next(iter(phase.train_sets.values()))
    reader = SeededDraws(dataset, seed=3)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b, other = reader[(1, 0)], reader[(1, 0)], reader[(1, 1)]
    assert torch.equal(torch.get_rng_state(), before)  # the RNG outside is untouched
    assert torch.equal(a["image"], b["image"])
    assert all(torch.equal(torch.as_tensor(a["aug"][k]), torch.as_tensor(b["aug"][k]))
               for k in a["aug"])  # fmt: skip
    differs = [reader[(1, d)]["image"] for d in range(1, 6)]
    assert any(not torch.equal(a["image"], x) for x in differs), "every draw gave one crop"
    assert other["id"] == a["id"]


def test_draw_sampler_reads_the_plain_indices_with_step_determined_draws() -> None:
    plain = StepBatchSampler(40, 4, seed=5, start_step=0)
    drawn = DrawBatchSampler(40, 4, seed=5, start_step=0, draws=3)
    resumed = DrawBatchSampler(40, 4, seed=5, start_step=7, draws=3)
    first = [b for b, _ in zip(drawn, range(12), strict=False)]
    assert [[i for i, _ in b] for b in first] == [plain.batch(s) for s in range(12)]
    assert {d for b in first for _, d in b} == {0, 1, 2}
    assert next(iter(resumed)) == first[7]
    with pytest.raises(ValueError, match="draws"):
        DrawBatchSampler(40, 4, seed=5, draws=0)


@pytest.mark.parametrize("kind", ["dense", "classification"])
def test_cached_outputs_and_step_equal_the_online_teachers_on_the_same_draws(
    kind: str, tiny_cache: Path, tmp_path: Path
) -> None:
    make = tiny_dense_config if kind == "dense" else tiny_config
    extra = ["teachers.output_cache.draws=2", "teachers.output_cache.dtype=float32",
             f"teachers.root={tmp_path / 'teachers'}"]  # fmt: skip
    cfg = make(tiny_cache, tmp_path, *extra)
    accelerator, data, teachers, phase = _phase(cfg, tmp_path)
    cached, record = with_output_cache(phase, cfg, accelerator, data, teachers)
    assert (
        cached.teachers.cached
        and not cached.teachers.teachers
        and cached.draws == 2
        and set(record) == set(phase.train_sets)
    )
    assert all(entry["built"] and entry["bytes_per_sample"] > 0 for entry in record.values())
    nets = {t: teacher.net for t, teacher in teachers.items()}
    for stream, reader in cached.train_sets.items():
        keys = [(0, 0), (1, 1), (2, 0)]
        samples = [reader[k] for k in keys]
        images = torch.stack([s["image"] for s in samples])
        mine = {t: n for t, n in nets.items() if phase.tasks[t].stream == stream}
        from unirep.batch import Batch

        online = teacher_outputs(mine, phase.tasks, Batch({stream: images}, {}, {}))
        for t, outputs in online.items():
            for key in samples[0]["teacher"][t]:
                stored = torch.stack([s["teacher"][t][key] for s in samples])
                torch.testing.assert_close(stored, outputs[key], atol=1e-5, rtol=1e-4)

    # the step on the cache equals the step with the teachers online on the same draws
    plain = dataclasses.replace(
        phase,
        train_sets={s: SeededDraws(d, phase.seed) for s, d in phase.train_sets.items()},
        draws=2,
        checkpoint_dir=tmp_path / "plain",
    )
    logs = {}
    for name, p in (("cached", cached), ("online", plain)):
        torch.manual_seed(0)
        _, _, _, fresh = _phase(cfg, tmp_path, name)  # the same initial student
        p = dataclasses.replace(p, module=fresh.module, checkpoint_dir=tmp_path / name / "ck")
        ctx, _ = setup(accelerator, p)
        logs[name] = [train_step(ctx, step) for step in range(2)]
    assert any(k.startswith("feature/") for k in logs["cached"][0])
    for a, b in zip(logs["cached"], logs["online"], strict=True):
        assert set(a) == set(b)
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_cache_is_keyed_reused_and_float16_within_rounding(tiny_cache: Path, tmp_path: Path):
    extra = ["teachers.output_cache.draws=2", f"teachers.root={tmp_path / 'teachers'}"]
    cfg = tiny_dense_config(tiny_cache, tmp_path, *extra)
    accelerator, data, teachers, phase = _phase(cfg, tmp_path)
    _, first = with_output_cache(phase, cfg, accelerator, data, teachers)
    _, again = with_output_cache(phase, cfg, accelerator, data, teachers)
    (stream,) = first
    assert first[stream]["built"] and not again[stream]["built"]
    assert first[stream]["folder"] == again[stream]["folder"]
    folder = Path(first[stream]["folder"])
    assert not folder.with_name(folder.name + ".tmp").exists()
    arrays = {p.name for p in folder.rglob("*.npy")}
    assert {"features.npy", "pred.npy", "ids.npy"} <= arrays
    # float16 outputs: within fp16 rounding of the teachers' online outputs
    cached, _ = with_output_cache(phase, cfg, accelerator, data, teachers)
    sample = cached.train_sets[stream][(0, 1)]
    from unirep.batch import Batch

    net = teachers["normal"].net
    online = teacher_outputs({"normal": net}, phase.tasks,
                             Batch({stream: sample["image"][None]}, {}, {}))  # fmt: skip
    torch.testing.assert_close(sample["teacher"]["normal"]["pred"][None],
                               online["normal"]["pred"], atol=2e-3, rtol=2e-3)  # fmt: skip
    # another teacher: another key, another folder
    with torch.no_grad():
        next(teachers["normal"].net.parameters()).add_(1.0)
    _, other = with_output_cache(phase, cfg, accelerator, data, teachers)
    assert other[stream]["built"] and other[stream]["folder"] != first[stream]["folder"]


class _PythonRandomCrop(Dataset):
    """A dataset whose augmentation draws from Python's ``random`` (not torch's RNG)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict:
        shift = random.randint(0, 1000)
        return {"image": torch.zeros(3, 8, 8), "id": i,
                "aug": {"crop": torch.tensor([shift, 0, 8, 8])}}  # fmt: skip


def test_a_dataset_drawing_outside_torch_rng_is_refused_in_one_line(tmp_path: Path) -> None:
    from unirep.teachers.output_cache import OutputStore

    folder = tmp_path / "store"
    (folder / "aug").mkdir(parents=True)
    np.save(folder / "ids.npy", np.arange(4))
    np.save(folder / "aug" / "crop.npy", np.zeros((4, 1, 4), np.int64))
    (folder / "manifest.json").write_text(
        '{"draws": 1, "outputs": {}, "arrays": ["ids", "aug/crop"], "samples": 4}'
    )
    reader = SeededDraws(_PythonRandomCrop(), seed=0, store=OutputStore(folder))
    random.seed(1)
    with pytest.raises(DataError, match="torch's RNG") as err:
        reader[(0, 0)]
    assert "\n" not in str(err.value) and "teachers.output_cache.draws=0" in str(err.value)


def test_bad_cache_settings_fail_at_start_up_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"teachers\.output_cache\.draws"):
        load_config("mini-scenes", ["teachers.output_cache.draws=-1"])
    with pytest.raises(ConfigError, match=r"teachers\.output_cache\.dtype.*float16, float32"):
        load_config("mini-scenes", ["teachers.output_cache.dtype=bfloat16"])


@pytest.mark.slow
def test_a_run_with_the_cache_finishes_and_a_second_run_reuses_it(tiny_cache: Path, tmp_path):
    from unirep.stage_one.train import ensure_teachers

    from unirep.pipeline.rundir import make_accelerator, prepare_run_dir
    from unirep.pipeline.stage_two import distill

    students = []
    for name in ("first", "second"):
        extra = ["teachers.output_cache.draws=2", f"teachers.root={tmp_path / 'teachers'}",
                 f"name={name}", "baseline=false"]  # fmt: skip
        cfg = tiny_dense_config(tiny_cache, tmp_path, *extra)
        accelerator = make_accelerator(cfg)
        data = resolve_data(cfg, accelerator)
        run_dir = prepare_run_dir(cfg, accelerator)
        ensure_teachers(cfg, accelerator, data, run_dir)
        metrics = distill(cfg, accelerator, data, run_dir)
        cache = metrics["summary"]["teacher_output_cache"]
        assert cache["draws"] == 2 and cache["dtype"] == "float16"
        assert cache["bytes_per_sample"]["images"] > 0
        students.append((run_dir / "student" / "model.safetensors").read_bytes())
    assert students[0] == students[1]
    assert len(list((tmp_path / "teachers" / "outputs").iterdir())) == 1


@pytest.mark.parametrize("kind", ["dense", "classification", "partial"])
def test_a_batch_replayed_from_the_cache_equals_the_seeded_samples(
    kind: str, tiny_cache: Path, tmp_path: Path
) -> None:
    """The batched read (stored draws replayed, no RNG, one gather per output array) gives the
    samples, ``aug`` records and cached outputs of the seeded one-by-one read, bit for bit."""
    extra = ["teachers.output_cache.draws=2", f"teachers.root={tmp_path / 'teachers'}"]
    if kind == "classification":
        cfg = tiny_config(tiny_cache, tmp_path, *extra)
    else:
        preset = "mini-scenes-onelabel" if kind == "partial" else "mini-scenes"
        cfg = tiny_dense_config(tiny_cache, tmp_path, *extra, preset=preset)
    accelerator, data, teachers, phase = _phase(cfg, tmp_path)
    cached, _ = with_output_cache(phase, cfg, accelerator, data, teachers)
    for reader in cached.train_sets.values():
        keys = [(0, 1), (3, 0), (1, 1), (0, 0)]
        batched = reader.__getitems__(keys)
        for key, fast in zip(keys, batched, strict=True):
            slow = reader[key]
            assert fast.keys() == slow.keys()
            for name, value in slow.items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(fast[name], value), name
                elif name == "teacher":
                    for t, outputs in value.items():
                        for k, v in outputs.items():
                            assert torch.equal(fast[name][t][k], v), (t, k)
                elif isinstance(value, dict):
                    for k, v in value.items():
                        assert torch.equal(torch.as_tensor(fast[name][k]), torch.as_tensor(v))
                else:
                    assert fast[name] == value, name


def _change_a_value(folder: Path, name: str) -> None:
    array = np.load(folder / f"{name}.npy", mmap_mode="r+")
    array.flat[0] = array.flat[0] + 1  # finite, and off by far more than fp16 rounding
    array.flush()


def _truncate(folder: Path, name: str) -> None:
    path = folder / f"{name}.npy"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 64])


def _other_format(folder: Path, name: str) -> None:
    from unirep.io import read_sealed_json, write_sealed_json

    manifest = read_sealed_json(folder / "manifest.json")
    write_sealed_json(folder / "manifest.json", {**manifest, "format": "unirep-teacher-outputs/1"})


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_change_a_value, "features.npy does not match the sha256 recorded when it was built"),
        (_truncate, "features.npy cannot be read"),
        (_other_format, "format 'unirep-teacher-outputs/1', this version reads"),
    ],
)
def test_a_damaged_cache_is_said_in_one_line_and_rebuilt(
    damage, reason: str, tiny_cache: Path, tmp_path: Path, capsys
) -> None:
    from unirep.io import read_sealed_json

    extra = ["teachers.output_cache.draws=2", f"teachers.root={tmp_path / 'teachers'}"]
    cfg = tiny_dense_config(tiny_cache, tmp_path, *extra)
    accelerator, data, teachers, phase = _phase(cfg, tmp_path)
    _, first = with_output_cache(phase, cfg, accelerator, data, teachers)
    (stream,) = first
    folder = Path(first[stream]["folder"])
    manifest = read_sealed_json(folder / "manifest.json")
    assert manifest["format"] == "unirep-teacher-outputs/2"
    assert set(manifest["array_sha256"]) == set(manifest["arrays"])
    name = next(a for a in manifest["arrays"] if a.endswith("/features"))
    original = np.load(folder / f"{name}.npy").copy()
    damage(folder, name)
    capsys.readouterr()
    _, again = with_output_cache(phase, cfg, accelerator, data, teachers)
    (said,) = [line for line in capsys.readouterr().out.splitlines() if " is damaged " in line]
    assert said.startswith(f"teacher-output cache {folder} is damaged (")
    assert reason in said and said.endswith("it will be rebuilt")
    assert again[stream]["built"] and again[stream]["folder"] == str(folder)
    np.testing.assert_array_equal(np.load(folder / f"{name}.npy"), original)
    _, third = with_output_cache(phase, cfg, accelerator, data, teachers)  # intact: reused
    assert not third[stream]["built"]
