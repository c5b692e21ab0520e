"""Models: timm-registered decathlon ResNets and SegNet, backbones by name, alignment and parallel
residual adapters, the multi-domain network (:mod:`~unirep.models.network`), the dense multi-task
network with its cross-task modules (:mod:`~unirep.models.dense`,
:mod:`~unirep.models.cross_task`), and :func:`~unirep.models.build.build_network` for both."""
