"""Evaluation: zero-shot scoring, the dataset registry and readers, logit projections, the paper's results tables."""

from anchor_clip.eval.datasets import EvalDataset, format_templates, from_eval_set
from anchor_clip.eval.projections import ClassSubset, LogitProjection, PooledClasses
from anchor_clip.eval.registry import DatasetInfo, build_eval_dataset, dataset_info, list_datasets, register_dataset
from anchor_clip.eval.tables import append_jsonl, load_results, results_table, to_markdown, write_results_table

# Importing the reader modules registers their datasets (timm's pattern for models).
from anchor_clip.eval import readers  # noqa: E402,F401  isort: skip

__all__ = [
    "ClassSubset",
    "DatasetInfo",
    "EvalDataset",
    "LogitProjection",
    "PooledClasses",
    "append_jsonl",
    "build_eval_dataset",
    "dataset_info",
    "format_templates",
    "from_eval_set",
    "list_datasets",
    "load_results",
    "register_dataset",
    "results_table",
    "to_markdown",
    "write_results_table",
]
