"""Sources, preprocessing, batching, inference, post-processing, decisions."""
