"""Evaluation: COCO-toolkit metrics, the `captioner evaluate` command and its HTML report.

The command's function is `captioner.evaluation.evaluate.evaluate` (not re-exported here: the package
attribute `evaluate` is the submodule once it is imported).
"""
from captioner.evaluation.metrics import METRIC_KEYS, Scores, ptb_tokenize, score_captions
from captioner.evaluation.report import plot_attention, write_report

__all__ = ["METRIC_KEYS", "Scores", "ptb_tokenize", "score_captions", "plot_attention", "write_report"]
