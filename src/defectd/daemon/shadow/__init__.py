"""Shadow mode: a candidate model inspects the live model's frames, after it and at a lower
priority, and what it would have decided is compared with the live verdict.

- ``config``: the ``[shadow]`` section (``ShadowConfig``).
- ``runner``: ``ShadowRunner``, the daemon's result observer that feeds the candidate, compares,
  archives disagreements, publishes the ``shadow`` summary and counts the metrics.
- ``store``: the SQLite record in ``<state_dir>/shadow/shadow.sqlite`` and ``shadow_report``,
  the summary ``defectd shadow report`` prints (a documented JSON contract, docs/lifecycle.md).

``config`` and ``store`` import no inference runtime (the CLI's report and the config loader
use them); ``runner`` does, through the engines it opens.
"""
