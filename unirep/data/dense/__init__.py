"""Dense multi-task data: the MTAN-format reader (NYUv2, Cityscapes), the generated mini-scenes,
dense data sources and label splits for partially labelled training."""
