"""Tasks carved from a domain with partly overlapping class sets: few training images per class,
labels relabelled 0..k−1, validation and test restricted to the task's classes, the union map."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from unirep.config.schema import CarvedTaskConfig, OverlapConfig
from unirep.data.carved import PooledStreams, union_classes
from unirep.data.classification.overlap import CarvedSet, carve_tasks
from unirep.errors import ConfigError
from unirep.pipeline.validate import load_config

# domain "d": 4 classes, 10 training / 3 validation / 4 test images per class; "e": 3 classes
LABELS = {
    ("d", "train"): [i % 4 for i in range(40)],
    ("d", "val"): [i % 4 for i in range(12)],
    ("d", "test"): [i % 4 for i in range(16)],
    ("e", "train"): [i % 3 for i in range(15)],
    ("e", "val"): [i % 3 for i in range(6)],
    ("e", "test"): [i % 3 for i in range(9)],
}
CLASSES = {"d": 4, "e": 3}


def _spec(n: int = 3, seed: int = 0, **tasks: tuple[str, list[int]]) -> OverlapConfig:
    tasks = tasks or {"a": ("d", [2, 0, 1]), "b": ("d", [2, 3]), "c": ("e", [0, 2])}
    return OverlapConfig(
        {t: CarvedTaskConfig(d, c) for t, (d, c) in tasks.items()}, samples_per_class=n, seed=seed
    )


def _carve(spec: OverlapConfig) -> Any:
    return carve_tasks(spec, lambda d, s: LABELS[d, s], CLASSES)


def test_each_task_gets_few_images_of_each_of_its_classes() -> None:
    carving = _carve(_spec(n=3))
    a = carving.tasks["a"]
    assert a.classes == (0, 1, 2)  # sorted: task label i is domain label classes[i]
    train = [LABELS["d", "train"][i] for i in a.indices["train"]]
    assert sorted(train) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len(carving.tasks["c"].indices["train"]) == 6


def test_tasks_sharing_a_class_see_different_images_of_it() -> None:
    carving = _carve(_spec(n=3))
    a, b = carving.tasks["a"], carving.tasks["b"]
    shared_a = {i for i in a.indices["train"] if LABELS["d", "train"][i] == 2}
    shared_b = {i for i in b.indices["train"] if LABELS["d", "train"][i] == 2}
    assert len(shared_a) == len(shared_b) == 3 and not shared_a & shared_b


def test_the_union_numbers_every_domain_class_once() -> None:
    carving = _carve(_spec())
    assert carving.union() == {"a": [0, 1, 2], "b": [2, 3], "c": [4, 5]}
    assert carving.union_classes == (("d", 0), ("d", 1), ("d", 2), ("d", 3), ("e", 0), ("e", 2))
    summary = carving.summary()
    assert summary["union_classes"] == 6
    assert summary["shared_classes"]["a"]["b"] == 1 and summary["shared_classes"]["a"]["c"] == 0


def test_validation_and_test_are_the_domains_restricted_to_the_classes() -> None:
    b = _carve(_spec()).tasks["b"]
    for split, size in (("val", 12), ("test", 16)):
        labels = [LABELS["d", split][i] for i in b.indices[split]]
        assert set(labels) == {2, 3}
        assert len(labels) == size // 2  # every image of those classes, not a few


def test_the_draw_follows_the_seed() -> None:
    assert _carve(_spec(seed=0)).tasks["a"].indices == _carve(_spec(seed=0)).tasks["a"].indices
    assert _carve(_spec(seed=0)).tasks["a"].indices != _carve(_spec(seed=1)).tasks["a"].indices


def test_impossible_carvings_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"overlap.tasks.a.classes.*valid: 0..3"):
        _carve(_spec(a=("d", [0, 4]), b=("d", [1, 2])))
    with pytest.raises(ConfigError, match=r"samples_per_class.*valid: at most 10"):
        _carve(_spec(n=11))


class FakeDomain:
    """A domain split: ``labels``, ``image_ids`` and samples ``{"image", "label", "image_id"}``."""

    def __init__(self, labels: list[int]) -> None:
        self.labels = labels
        self.image_ids = [1000 + i for i in range(len(labels))]
        self.class_names = [f"c{k}" for k in range(max(labels) + 1)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": torch.full((3, 2, 2), float(i)), "label": self.labels[i],
                "image_id": self.image_ids[i]}  # fmt: skip

    def category_id(self, label: int) -> int:
        return 500 + label


def test_a_carved_set_relabels_its_images() -> None:
    base = FakeDomain(LABELS["d", "train"])
    task = _carve(_spec()).tasks["b"]
    carved = CarvedSet(base, task.indices["train"], task.label_map(), task.classes)
    assert len(carved) == 6 and carved.num_classes == 2
    assert sorted(carved.labels) == [0, 0, 0, 1, 1, 1]
    for i in range(len(carved)):
        sample = carved[i]
        assert sample["label"] == task.label_map()[base.labels[task.indices["train"][i]]]
    batch = carved.__getitems__([0, 1])
    assert [s["label"] for s in batch] == [carved[0]["label"], carved[1]["label"]]
    assert all(torch.equal(s["image"], carved[i]["image"]) for i, s in enumerate(batch))
    assert carved.class_names == ["c2", "c3"] and carved.category_id(1) == 503


class FakeData:
    """Two carved tasks' datasets, as :class:`~unirep.data.carved.CarvedStreams` gives them."""

    def __init__(self) -> None:
        carving = _carve(_spec())
        self.carving, self.root = carving, "."
        self.sets = {}
        for t, c in carving.tasks.items():
            base = FakeDomain(LABELS[c.domain, "train"])
            self.sets[t] = CarvedSet(base, c.indices["train"], c.label_map(), c.classes)

    def union_classes(self) -> dict[str, list[int]]:
        return self.carving.union()

    def datasets(self, split: str, train: bool = False) -> dict[str, Any]:
        return self.sets

    def batch_sizes(self) -> dict[str, int]:
        return dict.fromkeys(self.sets, 4)


def test_the_auxiliary_task_pools_every_task_with_union_labels() -> None:
    data = FakeData()
    pooled = PooledStreams(data, union_classes(data))  # type: ignore[arg-type]
    dataset = pooled.datasets("train")["auxiliary"]
    assert len(dataset) == 9 + 6 + 6
    labels = [dataset[i]["label"] for i in range(len(dataset))]
    assert sorted(set(labels)) == [0, 1, 2, 3, 4, 5]
    assert labels.count(2) == 6  # class d/2 from a and from b: one union label
    assert pooled.batch_sizes() == {"auxiliary": 12}


def _load(*overrides: str) -> Any:
    return load_config("mini-decathlon-overlap", list(overrides))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("classification.overlap.tasks={a: {domain: objects, classes: [0, 1]}}",
         "at least 2 tasks"),
        ("classification.overlap.tasks={a: {domain: objects, classes: [0]}, "
         "b: {domain: toys, classes: [0, 1]}}", "overlap.tasks.a.classes': a task needs"),
        ("classification.overlap.tasks={a: {domain: nowhere, classes: [0, 1]}, "
         "b: {domain: toys, classes: [0, 1]}}", "overlap.tasks.a.domain': 'nowhere'"),
        ("classification.overlap.samples_per_class=0", "overlap.samples_per_class"),
        ("classification.crops={toys: 24}", "classification.crops"),
    ],
)  # fmt: skip
def test_the_config_names_the_bad_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(override)


def test_the_preset_loads() -> None:
    cfg = _load()
    assert cfg.classification.sharing.name == "pruned_auxiliary"
    assert len(cfg.classification.overlap.tasks) == 4
