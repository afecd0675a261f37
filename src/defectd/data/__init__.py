"""What the station and training share, without torch: datasets and their manifest
(``datasets``), the synthetic part renderer (``synth``) and segmentation metrics (``metrics``).

A leaf: it imports only ``defectd.errors`` and ``defectd.log`` of ours, so the daemon, the
pipeline and calibration use it without loading ``defectd.training``.
"""
