"""The torch side of the model's life cycle: augmentation, losses, the training loop,
evaluation. Datasets, synthetic parts and metrics, which the station uses too, live in
``defectd.data``."""
