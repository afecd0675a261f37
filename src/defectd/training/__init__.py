"""Datasets, synthetic defects, augmentation, training, evaluation and export."""
