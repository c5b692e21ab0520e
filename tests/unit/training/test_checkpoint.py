"""Checkpoints are verified before resume: every file of a ``step_*`` folder carries the sha256
written with it in ``trainer_state.json`` (sealed with its own); a damaged newest checkpoint (a
1-ulp change in the weights, a deleted RNG file, a truncated or garbage ``optim.pt``, an invalid
or edited trainer state) is skipped in one line and the previous intact one is used; with none
intact the resume stops in one line naming the folder. The best weights are checked against the
sha256 recorded when they were written, and a finished phase whose ``best.safetensors`` changed
is refused in one line (whole ``fit`` runs on the tiny benchmark, both ways)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn

from unirep.errors import UnirepError
from unirep.io import load_weights, save_weights
from unirep.layout import BEST, DONE, OPTIMIZERS, TRAINER_STATE, WEIGHTS
from unirep.training.checkpoint import (
    check_best,
    intact_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    verify_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _parts() -> tuple[nn.Module, list, list]:
    torch.manual_seed(0)
    module = nn.Linear(4, 3)
    opt = torch.optim.Adam(module.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return module, [opt], [sched]


def _train(module: nn.Module, opts: list, scheds: list) -> None:
    module(torch.randn(2, 4)).square().sum().backward()
    for o, s in zip(opts, scheds, strict=True):
        o.step()
        o.zero_grad()
        s.step()


def _checkpoints(directory: Path, steps: tuple[int, ...] = (2, 4)) -> dict[int, dict]:
    """Checkpoints of a small module at ``steps``; ``{step: its weights}``."""
    accelerator = Accelerator(cpu=True)
    module, opts, scheds = _parts()
    weights = {}
    for step in steps:
        _train(module, opts, scheds)
        state = {"best_val": 0.5, "best_step": step, "seconds": 1.0, "skipped_steps": 0}
        save_checkpoint(accelerator, directory, step, module, opts, scheds, state, keep=3)
        weights[step] = {k: v.clone() for k, v in module.state_dict().items()}
    return weights


def _one_ulp(path: Path) -> None:
    state = load_file(str(path / WEIGHTS))
    name = sorted(state)[0]
    value = state[name].numpy().copy()
    value.flat[0] = np.nextafter(value.flat[0], np.float32(np.inf), dtype=np.float32)
    state[name] = torch.from_numpy(value)
    save_file(state, str(path / WEIGHTS))  # a valid file, one weight 1 ulp away


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _edit_state(path: Path) -> None:
    record = json.loads((path / TRAINER_STATE).read_text())
    record["best_val"] = 0.75  # valid JSON, another value
    (path / TRAINER_STATE).write_text(json.dumps(record))


TAMPER: dict[str, tuple[Callable[[Path], None], str]] = {
    "1-ulp weight": (_one_ulp, f"{WEIGHTS} does not match the sha256"),
    "deleted rng_0.pt": (lambda p: (p / "rng_0.pt").unlink(), "rng_0.pt is missing"),
    "truncated optim.pt": (lambda p: _truncate(p / OPTIMIZERS), f"{OPTIMIZERS} does not match"),
    "garbage optim.pt": (lambda p: (p / OPTIMIZERS).write_bytes(b"garbage"), OPTIMIZERS),
    "invalid trainer_state.json": (
        lambda p: (p / TRAINER_STATE).write_text("{not json"),
        f"{TRAINER_STATE} is not valid JSON",
    ),
    "edited trainer_state.json": (_edit_state, f"{TRAINER_STATE} does not match the sha256"),
    "deleted trainer_state.json": (
        lambda p: (p / TRAINER_STATE).unlink(),
        f"{TRAINER_STATE} is missing",
    ),
}


def test_a_checkpoint_records_every_file_and_round_trips(tmp_path: Path) -> None:
    weights = _checkpoints(tmp_path)
    path, state = intact_checkpoint(tmp_path)  # type: ignore[misc]
    assert path.name == "step_000004" and state["step"] == 4
    record = json.loads((path / TRAINER_STATE).read_text())
    assert set(record["files"]) == {WEIGHTS, OPTIMIZERS, "rng_0.pt"}
    assert record["processes"] == 1 and isinstance(record["sha256"], str)
    module, opts, scheds = _parts()
    restored = load_checkpoint(Accelerator(cpu=True), path, module, opts, scheds)
    assert restored["step"] == 4 and "files" not in restored and "sha256" not in restored
    for k, v in weights[4].items():
        assert torch.equal(module.state_dict()[k], v)


@pytest.mark.parametrize("damage", list(TAMPER))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one_and_says_so(
    damage: str, tmp_path: Path
) -> None:
    weights = _checkpoints(tmp_path)
    tamper, reason = TAMPER[damage]
    tamper(tmp_path / "step_000004")
    said: list[str] = []
    found = intact_checkpoint(tmp_path, said.append)
    assert found is not None and found[0].name == "step_000002" and found[1]["step"] == 2
    (line,) = said
    assert "\n" not in line and "step_000004" in line and reason in line
    assert "resuming from step_000002" in line
    assert latest_checkpoint(tmp_path, said.append).name == "step_000002"  # type: ignore[union-attr]
    module, opts, scheds = _parts()
    load_checkpoint(Accelerator(cpu=True), found[0], module, opts, scheds, found[1])
    for k, v in weights[2].items():
        assert torch.equal(module.state_dict()[k], v)
    # the damaged one named directly (resume=<folder>) is refused in one line
    with pytest.raises(UnirepError, match="step_000004 is damaged") as err:
        load_checkpoint(Accelerator(cpu=True), tmp_path / "step_000004", module, opts, scheds)
    assert "\n" not in str(err.value) and reason in str(err.value)


def test_no_intact_checkpoint_is_one_line_naming_the_folder(tmp_path: Path) -> None:
    _checkpoints(tmp_path)
    _one_ulp(tmp_path / "step_000004")
    (tmp_path / "step_000002" / "rng_0.pt").unlink()
    with pytest.raises(UnirepError) as err:
        intact_checkpoint(tmp_path, print)
    message = str(err.value)
    assert "\n" not in message and f"no intact checkpoint in {tmp_path}" in message
    assert "step_000004" in message and "rng_0.pt is missing" in message
    assert "overwrite=true" in message
    assert intact_checkpoint(tmp_path / "nothing-yet") is None  # a fresh phase: nothing to resume


def test_a_checkpoint_of_another_step_or_without_hashes_is_refused(tmp_path: Path) -> None:
    _checkpoints(tmp_path)
    (tmp_path / "step_000004").rename(tmp_path / "step_000006")
    with pytest.raises(UnirepError, match="records step 4"):
        verify_checkpoint(tmp_path / "step_000006")
    (tmp_path / "step_000002" / TRAINER_STATE).write_text('{"step": 2}')  # an unsealed record
    with pytest.raises(UnirepError, match="carries no sha256"):
        verify_checkpoint(tmp_path / "step_000002")


def test_an_rng_file_the_checkpoint_does_not_record_is_not_read(tmp_path: Path, capsys) -> None:
    _checkpoints(tmp_path, (2,))

    class Rank1:
        process_index = 1

        @staticmethod
        def print(*args: object) -> None:
            print(*args)

    torch.save({"python": None}, tmp_path / "step_000002" / "rng_1.pt")  # not recorded
    restore_rng(Rank1(), tmp_path / "step_000002")
    assert "written by fewer processes" in capsys.readouterr().out


def test_best_weights_are_checked_against_their_recorded_sha256(tmp_path: Path) -> None:
    digest = save_weights(tmp_path / BEST, {"w": torch.arange(4.0)})
    assert check_best(tmp_path, digest, "student") == tmp_path / BEST
    data = bytearray((tmp_path / BEST).read_bytes())
    data[-1] ^= 0x01  # a flipped bit in the last weight
    (tmp_path / BEST).write_bytes(bytes(data))
    for expected in (digest, None):
        with pytest.raises(UnirepError) as err:
            check_best(tmp_path, expected, "student")
        message = str(err.value)
        assert "\n" not in message and str(tmp_path / BEST) in message
        assert f"delete {tmp_path}" in message and "overwrite=true" in message
    (tmp_path / BEST).unlink()
    with pytest.raises(UnirepError, match="is missing"):
        check_best(tmp_path, digest, "student")


@pytest.mark.slow
def test_fit_resumes_from_the_previous_intact_checkpoint_and_refuses_a_changed_best(
    tiny_cache: Path, tmp_path: Path, capsys
) -> None:
    from tests.conftest import tiny_config
    from unirep.pipeline.stage_two import resolve_data, student_phase
    from unirep.training.evaluator import Evaluator
    from unirep.training.trainer import fit

    steps = ["train.max_steps=6", "train.eval_every=2", "train.checkpoint_every=2",
             "train.keep_checkpoints=3", "classification.init_from_teacher=null"]  # fmt: skip
    cfg = tiny_config(tiny_cache, tmp_path, *steps)
    accelerator = Accelerator(cpu=True)
    data = resolve_data(cfg, accelerator)
    tasks = data.tasks()
    evaluator = Evaluator(accelerator, cfg.data.eval_batch_size)

    def run():
        phase, _ = student_phase(cfg, accelerator, "baseline", data, tasks, tmp_path, {}, None,
                                 False)  # fmt: skip
        return phase, fit(accelerator, phase, evaluator, progress=False)

    phase, first = run()
    folder = phase.checkpoint_dir
    done = json.loads((folder / DONE).read_text())
    assert isinstance(done["best_sha256"], str) and isinstance(done["sha256"], str)
    trained = {k: v.clone() for k, v in phase.module.student.state_dict().items()}
    best = (folder / BEST).read_bytes()

    # the newest checkpoint 1 ulp off: resumed from the one before, to the same weights
    (folder / DONE).unlink()
    _one_ulp(folder / "step_000004")
    capsys.readouterr()
    phase, again = run()
    out = capsys.readouterr().out
    assert "step_000004 is damaged" in out and "resuming from step_000002" in out
    assert "resumed from" in out and "step_000002 at step 2" in out
    assert (again.best_val, again.best_step) == (first.best_val, first.best_step)
    for k, v in phase.module.student.state_dict().items():
        assert torch.equal(v, trained[k]), k
    assert (folder / BEST).read_bytes() == best

    # a flipped byte in the finished phase's best weights: refused in one line, not loaded
    data_bytes = bytearray(best)
    data_bytes[-3] ^= 0x10
    (folder / BEST).write_bytes(bytes(data_bytes))
    with pytest.raises(UnirepError) as err:
        run()
    assert "\n" not in str(err.value) and "[baseline] best weights" in str(err.value)
    # ... and an edited phase record likewise
    (folder / BEST).write_bytes(best)
    record = json.loads((folder / DONE).read_text())
    (folder / DONE).write_text(json.dumps({**record, "best_val": 1.0}))
    with pytest.raises(UnirepError, match=r"phase record .* is damaged \(done\.json does not"):
        run()
    assert load_weights(folder / BEST).keys() == trained.keys()


def test_weights_that_do_not_fit_the_network_are_one_line_never_a_partial_load() -> None:
    """A checkpoint or best weights of another network (another version or config): one
    UnirepError line naming the file, for renamed keys and for other shapes alike."""
    from torch import nn

    from unirep.errors import UnirepError
    from unirep.training.checkpoint import load_fitting

    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    renamed = {f"gates.{k}": v for k, v in net.state_dict().items()}
    with pytest.raises(
        UnirepError, match=r"checkpoint /x does not fit .*missing \['0.weight'"
    ) as err:
        load_fitting(net, renamed, "checkpoint /x")
    assert "\n" not in str(err.value) and "overwrite=true" in str(err.value)
    wider = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2)).state_dict()
    with pytest.raises(UnirepError, match="best weights /y does not fit") as err:
        load_fitting(net, wider, "best weights /y")
    assert "\n" not in str(err.value)
    load_fitting(net, nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).state_dict(), "fine")
