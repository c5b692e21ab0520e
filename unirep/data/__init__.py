"""Data of both kinds of run: classification sources in :mod:`unirep.data.classification`, dense
sources in :mod:`unirep.data.dense`; beside them what every run shares: the run's data seam
(:mod:`~unirep.data.streams`), multi-stream sampling, the in-memory sample cache, generated-data
folders, and the config and data checks made before any work (:mod:`~unirep.data.validation`)."""
