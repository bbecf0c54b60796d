"""Evaluation: COCO-toolkit metrics (metrics.py, cider.py, chair.py), the `captioner evaluate` command
(evaluate.py) and its HTML report (report.py).

Nothing is imported here, so training can use the metrics without loading the command or the report.
"""
