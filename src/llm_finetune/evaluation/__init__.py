"""Evaluation: score.py (loss and generation, model against model), run.py (the `eval` verb),
report.py (report.md / report.json / plots), metrics.py (task metrics and intervals), leakage.py
(held-out rows that were also trained on)."""
