"""One table of every evaluated dataset's results, whatever their tasks (a model with several
tasks is evaluated on several datasets in one --eval-only run)."""
from typing import Mapping

from tabulate import tabulate

__all__ = ["results_table"]

# metrics per evaluation kind shown in the table (the evaluators return more, e.g. COCO's
# per-category APs, which detectron2's own per-dataset printout already lists)
_MAX_METRICS = 6


def results_table(results: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """{dataset: {kind ("bbox", "segm", "classification", ...): {metric: value}}} -> a
    pipe table with one row per (dataset, kind): its first metrics, per-category entries
    ("AP-<name>") left out."""
    rows = []
    for dataset, by_kind in results.items():
        for kind, metrics in by_kind.items():
            # per-category entries are COCO's "AP-<name>" ("BLEU-4" or "ROUGE-L" are not)
            shown = [(k, v) for k, v in metrics.items()
                     if not k.startswith("AP-")][:_MAX_METRICS]
            rows.append([dataset, kind, ", ".join(f"{k} {v:.2f}" for k, v in shown)])
    return tabulate(rows, headers=["dataset", "evaluation", "metrics"], tablefmt="pipe")
