"""The pruned auxiliary network: per-task importance from the task's labels, the keep ratio,
masks applied per sample in the forward, the auxiliary loss, export and reload."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unirep.batch import Batch
from unirep.models.build import build_network, exported
from unirep.models.pruned_auxiliary import (
    FEATURE,
    PrunedAuxiliaryNet,
    hidden_layers,
    keep_masks,
    mask_overlap,
    taylor_importance,
)
from unirep.pipeline.overlap import AuxiliaryLoss
from unirep.tasks import TASK_KINDS, Task

ARCH = {"backbone": "resnet_decathlon_tiny", "backbone_kwargs": {}, "sharing": "pruned_auxiliary",
        "sharing_kwargs": {"keep": 0.5, "union": {"a": [0, 1, 2], "b": [2, 3]}}}  # fmt: skip


def _tasks() -> dict[str, Task]:
    kind = TASK_KINDS.build("classification")
    return {"a": Task("a", kind, "a", 3), "b": Task("b", kind, "b", 2)}


def _toy() -> tuple[nn.Module, nn.Linear]:
    """A 4-unit feature (identity) and a head where union class ``c`` reads only unit ``c``
    (unit 3 feeds no class)."""
    backbone = nn.Linear(4, 4)
    head = nn.Linear(4, 3)
    with torch.no_grad():
        backbone.weight.copy_(torch.eye(4))
        backbone.bias.zero_()
        head.weight.copy_(2 * torch.eye(4)[:3])
        head.bias.zero_()
    return backbone, head


def test_a_unit_only_one_tasks_classes_read_is_kept_by_it_and_pruned_by_the_other() -> None:
    backbone, head = _toy()
    x = torch.rand(16, 4, generator=torch.Generator().manual_seed(0)) + 0.5
    labels = torch.arange(16) % 2
    scores = {
        task: taylor_importance(backbone, head, [(x, labels)], classes)
        for task, classes in (("A", [0, 1]), ("B", [1, 2]))
    }
    assert scores["A"][FEATURE][2] == 0 and scores["A"][FEATURE][3] == 0  # B's class, no class
    assert scores["B"][FEATURE][0] == 0 and scores["B"][FEATURE][3] == 0
    assert scores["A"][FEATURE][0] > 0 and scores["B"][FEATURE][2] > 0
    masks = {t: keep_masks(s, keep=0.5)[FEATURE] for t, s in scores.items()}
    assert masks["A"].tolist() == [True, True, False, False]  # unit 0: A's class only
    assert masks["B"].tolist() == [False, True, True, False]  # unit 2: B's class only
    record = {t: {FEATURE: m.int().tolist()} for t, m in masks.items()}
    assert mask_overlap(record)["A"]["B"] == 1 / 3


def test_the_importance_is_the_mean_taylor_term_of_a_naive_loop() -> None:
    torch.manual_seed(0)
    backbone, head = nn.Sequential(nn.Linear(5, 6), nn.Tanh()), nn.Linear(6, 4)
    x, y = torch.randn(7, 5), torch.randint(0, 2, (7,))
    got = taylor_importance(backbone, head, [(x[:3], y[:3]), (x[3:], y[3:])], [3, 1])[FEATURE]
    total = torch.zeros(6)
    for i in range(7):  # one sample at a time: |a · ∂ log p(y | x, {3, 1}) / ∂a|
        a = backbone(x[i : i + 1])
        logp = F.log_softmax(head(a)[:, [3, 1]], dim=1)[0, y[i]]
        (g,) = torch.autograd.grad(logp, a)
        total += (a * g).abs()[0].detach()
    torch.testing.assert_close(got, total / 7)


def test_the_keep_ratio_is_respected_in_every_layer() -> None:
    net = build_network(ARCH, _tasks())
    assert list(net.widths) == ["stages.0.0", "stages.1.0", "stages.2.0", FEATURE]
    assert set(hidden_layers(net.backbone)) == set(net.widths)
    scores = {n: torch.rand(w) for n, w in net.widths.items()}
    for keep in (0.25, 0.5, 1.0):
        masks = keep_masks(scores, keep)
        assert {n: int(m.sum()) for n, m in masks.items()} == {
            n: max(1, round(keep * w)) for n, w in net.widths.items()
        }
    top = keep_masks({"x": torch.tensor([0.1, 0.9, 0.5, 0.9])}, 0.5)["x"]
    assert top.tolist() == [False, True, False, True]


def _random_masks(net: PrunedAuxiliaryNet, seed: int = 0) -> dict[str, dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    return {
        t: {n: (torch.rand(w, generator=g) < 0.5).int().tolist() for n, w in net.widths.items()}
        for t in net.tasks
    }


def test_masks_apply_per_sample_in_the_forward() -> None:
    torch.manual_seed(0)
    net = build_network(ARCH, _tasks())
    assert isinstance(net, PrunedAuxiliaryNet)
    masks = _random_masks(net)
    net.set_masks(masks)
    assert net.masks() == masks
    net.eval()
    xa, xb = torch.randn(3, 3, 28, 28), torch.randn(2, 3, 28, 28)
    together = net({"a": xa, "b": xb})
    for task, x in (("a", xa), ("b", xb)):
        alone = net({task: x})[task]
        torch.testing.assert_close(together[task]["pred"], alone["pred"])
        dropped = torch.tensor(masks[task][FEATURE]) == 0
        assert torch.all(together[task]["features"][:, dropped] == 0)
    net.set_masks({t: {n: [1] * w for n, w in net.widths.items()} for t in net.tasks})
    unmasked = net({"a": xa})["a"]["pred"]
    assert not torch.allclose(unmasked, together["a"]["pred"])  # the masks change predictions
    with torch.no_grad():
        plain = net.heads["a"](net.backbone(xa))
    torch.testing.assert_close(unmasked, plain)


def test_training_adds_the_unpruned_auxiliary_logits() -> None:
    torch.manual_seed(0)
    net = build_network(ARCH, _tasks())
    net.set_masks(_random_masks(net))
    out = net.train()({"a": torch.randn(4, 3, 28, 28), "b": torch.randn(4, 3, 28, 28)})
    assert out["a"]["auxiliary"].shape == (4, 4) and out["b"]["auxiliary"].shape == (4, 4)
    assert "auxiliary" not in net.eval()({"a": torch.randn(2, 3, 28, 28)})["a"]
    loss = sum(o["pred"].sum() + o["auxiliary"].sum() for o in out.values())
    loss.backward()  # type: ignore[union-attr]
    assert all(p.grad is not None for p in net.parameters())


def test_it_starts_from_the_auxiliary_network() -> None:
    torch.manual_seed(0)
    net = build_network(ARCH, _tasks())
    aux = build_network({"backbone": "resnet_decathlon_tiny"}, {"x": _tasks()["a"]})
    head = nn.Linear(64, 4)
    masks = _random_masks(net)
    net.start_from(aux.backbone, head, masks)
    assert all(torch.equal(v, aux.backbone.state_dict()[k])
               for k, v in net.backbone.state_dict().items())  # fmt: skip
    assert torch.equal(net.heads["b"].weight, head.weight[[2, 3]])
    assert torch.equal(net.auxiliary_head.weight, head.weight)
    assert net.masks() == masks


def test_the_export_drops_the_auxiliary_head_and_reloads_to_the_same_predictions() -> None:
    torch.manual_seed(0)
    net = build_network(ARCH, _tasks())
    net.set_masks(_random_masks(net))
    arch, export = exported(net, ARCH)
    assert export.auxiliary_head is None and arch["sharing_kwargs"]["auxiliary_head"] is False
    state = {k: v.clone() for k, v in export.state_dict().items()}
    assert "unit_masks" in state and not any(k.startswith("auxiliary_head") for k in state)
    again = build_network(arch, _tasks())
    again.load_state_dict(state, strict=True)
    x = {"a": torch.randn(2, 3, 28, 28), "b": torch.randn(3, 3, 28, 28)}
    net.eval(), export.eval(), again.eval()
    for task in ("a", "b"):
        torch.testing.assert_close(again(x)[task]["pred"], net(x)[task]["pred"])
    record = net.sharing_record()
    assert record["kept"]["a"] == {n: sum(m) for n, m in net.masks()["a"].items()}
    assert record["overlap"]["a"]["a"] == 1.0


def test_the_auxiliary_loss_is_cross_entropy_on_union_labels() -> None:
    torch.manual_seed(0)
    union = {"a": [0, 1, 2], "b": [2, 3]}
    term = AuxiliaryLoss(union, weight=0.5, streams={"a": "a", "b": "b"})
    outputs = {"a": {"pred": torch.randn(4, 3), "auxiliary": torch.randn(4, 4)},
               "b": {"pred": torch.randn(2, 2), "auxiliary": torch.randn(2, 4)}}  # fmt: skip
    targets = {"a": torch.tensor([0, 2, 1, 2]), "b": torch.tensor([1, 0])}
    masks = {t: torch.ones(len(y), dtype=torch.bool) for t, y in targets.items()}
    batch = Batch(inputs={}, targets=targets, label_mask=masks)
    values, logs = term(outputs, batch, 0)
    expected = (
        F.cross_entropy(outputs["a"]["auxiliary"], torch.tensor([0, 2, 1, 2]))
        + F.cross_entropy(outputs["b"]["auxiliary"], torch.tensor([3, 2]))
    ) / 2
    torch.testing.assert_close(values["auxiliary"], 0.5 * expected)
    torch.testing.assert_close(logs["loss"], expected)
