"""Metrics accumulated over whole splits: accuracy and the Visual Decathlon scores
(:mod:`~unirep.metrics.classification`), segmentation, depth and normal meters
(:mod:`~unirep.metrics.dense`), and Δm."""
