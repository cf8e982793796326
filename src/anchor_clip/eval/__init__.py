"""Evaluation: the dataset registry, ImageNet class masks, and the paper's results tables."""

from anchor_clip.eval.datasets import (
    DatasetInfo,
    EvalDataset,
    build_eval_dataset,
    dataset_info,
    format_templates,
    from_eval_set,
    list_datasets,
    register_dataset,
)
from anchor_clip.eval.masks import ClassSubset, LogitProjection, PooledClasses
from anchor_clip.eval.tables import append_jsonl, load_results, results_table, to_markdown, write_results_table

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
