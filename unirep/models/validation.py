"""The config rules the networks own: the backbone, the adapters, the dense encoder and the
cross-task attention modules, each named in its registry with arguments its builder takes."""

from __future__ import annotations

from unirep.config.binder import bind_spec, trial
from unirep.config.schema import Config
from unirep.errors import ConfigError
from unirep.models.adapters import ADAPTERS
from unirep.models.automtl import check_automtl_arguments
from unirep.models.backbones import is_backbone
from unirep.models.cross_task import CROSS_TASK
from unirep.models.dense import DENSE_ENCODERS
from unirep.models.fusion import check_pdf_arguments
from unirep.models.pruned_auxiliary import check_pruned_arguments
from unirep.models.pruning import check_disparse_arguments
from unirep.models.sharing import CLASSIFICATION_SHARING, SHARING, check_smtl_arguments

CLASSIFICATION_CHECKS = {"smtl": check_smtl_arguments, "pruned_auxiliary": check_pruned_arguments}
"""Each classification student architecture's own check of its arguments."""


def check_config(cfg: Config) -> None:
    """Raise :class:`ConfigError`, naming the key, for a network that cannot be built."""
    if cfg.classification is not None:
        spec = cfg.classification
        if not is_backbone(spec.backbone):
            raise ConfigError(
                f"config key 'classification.backbone': unknown backbone {spec.backbone!r}; "
                "valid choices: any name in timm.list_models(), e.g. resnet26_decathlon, "
                "resnet_decathlon_tiny, resnet18"
            )
        bind_spec(ADAPTERS, spec.adapter, "classification.adapter", ("in_dim", "out_dim"))
        if spec.sharing is not None:
            supplied = ("backbone", "num_classes", "backbone_state")
            bind_spec(CLASSIFICATION_SHARING, spec.sharing, "classification.sharing", supplied)
            kwargs = spec.sharing.kwargs
            check = CLASSIFICATION_CHECKS.get(spec.sharing.name)
            if check is not None:
                trial("classification.sharing.kwargs", lambda: check(**kwargs))
            if spec.residual_adapters:
                raise ConfigError(
                    "config keys 'classification.sharing' and 'classification.residual_adapters' "
                    "cannot be combined; set residual_adapters=false or sharing=null"
                )
        return
    dense = cfg.dense
    assert dense is not None
    bind_spec(DENSE_ENCODERS, dense.encoder, "dense.encoder")
    if dense.student_encoder is not None:
        bind_spec(DENSE_ENCODERS, dense.student_encoder, "dense.student_encoder")
    if dense.cross_task is not None:
        bind_spec(CROSS_TASK, dense.cross_task, "dense.cross_task", ("tasks", "channels"))
    if dense.sharing is not None:
        supplied = ("encoder", "tasks", "decoder_channels", "unit_vector")
        bind_spec(SHARING, dense.sharing, "dense.sharing", supplied)
        kwargs = dense.sharing.kwargs
        if dense.sharing.name == "smtl":
            trial("dense.sharing.kwargs", lambda: check_smtl_arguments(**kwargs))
        if dense.sharing.name == "pdf":
            trial("dense.sharing.kwargs", lambda: check_pdf_arguments(**kwargs))
        if dense.sharing.name == "automtl":
            trial("dense.sharing.kwargs", lambda: check_automtl_arguments(**kwargs))
        if dense.sharing.name == "disparse":
            trial("dense.sharing.kwargs", lambda: check_disparse_arguments(**kwargs))
        if dense.cross_task is not None:
            raise ConfigError(
                f"config keys 'dense.sharing' ({dense.sharing.name}) and 'dense.cross_task' "
                f"({dense.cross_task.name}) cannot be combined; set one of them to null"
            )
