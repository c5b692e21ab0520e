"""Teachers for multi-domain classification: one single-domain network per domain.

Each teacher is the run's backbone with one linear head, trained with the task loss on its domain's
train split, selected on its val split, and saved with its manifest under
``<teacher_root>/<preset>/<domain>/``. With ``teachers.finetune_from`` (Visual Decathlon: ImageNet)
that domain's teacher is trained first from scratch and initialises the others, which then follow
``teachers.finetune_train`` (Rebuffi et al. 2017; Li, Liu & Bilen 2023).
"""

from __future__ import annotations

import copy
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import set_seed

from unirep.config import Config, ConfigError
from unirep.data.sources import DomainSet
from unirep.models.network import build_network
from unirep.objective import TaskObjective
from unirep.pipeline import architecture, data_fingerprint, load_domain_teacher, teacher_root
from unirep.teachers import MANIFEST, load_teacher, save_teacher, teacher_dir
from unirep.trainer import Evaluator, Phase, fit


def _order(cfg: Config, domains: list[str]) -> list[str]:
    source = cfg.teachers.finetune_from
    if source is None:
        return list(domains)
    if source not in domains:
        raise ConfigError(
            f"config key 'teachers.finetune_from': {source!r} is not a domain of this run "
            f"({', '.join(domains)})"
        )
    return [source] + [d for d in domains if d != source]


def _is_usable(cfg: Config, domains: DomainSet, domain: str, directory: Path) -> bool:
    """An existing teacher is reused only if it verifies; a mismatch is an error, not a retrain."""
    if cfg.teachers.retrain or not (directory / MANIFEST).exists():
        return False
    load_domain_teacher(cfg, domains, domain)
    return True


def train_teacher(
    cfg: Config,
    accelerator: Accelerator,
    domains: DomainSet,
    domain: str,
    run_dir: Path,
    evaluator: Evaluator,
    init_from: Path | None = None,
) -> float:
    """Train and save one domain's teacher; returns the training seconds."""
    set_seed(cfg.seed)
    train_set = domains.dataset(domain, "train", train=True)
    net = build_network(
        cfg.model.backbone, cfg.model.backbone_kwargs, {domain: train_set.num_classes}
    )
    recipe = cfg.teachers.train
    if init_from is not None:
        source = load_teacher(init_from, cfg.teachers.finetune_from or "")
        net.backbone.load_state_dict(source.net.backbone.state_dict(), strict=True)
        recipe = copy.deepcopy(cfg.teachers.finetune_train or recipe)
        if domain in cfg.teachers.finetune_lr:  # e.g. 0.1 or 0.01 per domain in the reference
            recipe.optim.optimizer.kwargs["lr"] = cfg.teachers.finetune_lr[domain]
    name = f"teacher-{domain}"
    phase = Phase(
        name=name,
        net=net,
        objective=TaskObjective(cfg.distill),
        train_sets={domain: train_set},
        val_sets={domain: domains.dataset(domain, "val")},
        batch_sizes={domain: domains.batch_size(domain)},
        cfg=recipe,
        checkpoint_dir=run_dir / "checkpoints" / name,
        log_dir=run_dir / "logs",
        seed=cfg.seed,
        num_workers=cfg.data.num_workers,
    )
    result = fit(accelerator, phase, evaluator, progress=cfg.progress)
    if accelerator.is_main_process:
        save_teacher(
            teacher_dir(teacher_root(cfg), cfg.preset, domain),
            net,
            domain,
            architecture=architecture(cfg),
            preprocessing=domains.preprocessing(domain),
            data={
                "root": str(domains.root),
                "split": "train",
                "selection_split": "val",
                "num_samples": len(train_set),
                "fingerprint": data_fingerprint(domains, domain),
            },
            val_metrics={"accuracy": result.best_val},
            training={
                "steps": recipe.max_steps,
                "best_step": result.best_step,
                "seed": cfg.seed,
                "finetuned_from": str(init_from) if init_from else None,
                "seconds": result.seconds,
            },
            class_names=train_set.class_names,
        )
    accelerator.wait_for_everyone()
    return result.seconds


def ensure_teachers(
    cfg: Config, accelerator: Accelerator, domains: DomainSet, run_dir: Path
) -> float:
    """Train every missing teacher (verifying the existing ones); returns the seconds spent."""
    evaluator = Evaluator(accelerator, cfg.data.eval_batch_size, cfg.data.num_workers)
    root = teacher_root(cfg)
    seconds = 0.0
    for domain in _order(cfg, domains.domains):
        directory = teacher_dir(root, cfg.preset, domain)
        if _is_usable(cfg, domains, domain, directory):
            accelerator.print(f"[teacher-{domain}] found {directory}")
            continue
        source = cfg.teachers.finetune_from
        init_from = teacher_dir(root, cfg.preset, source) if source and source != domain else None
        seconds += train_teacher(cfg, accelerator, domains, domain, run_dir, evaluator, init_from)
        accelerator.print(f"[teacher-{domain}] saved {directory}")
    return seconds
