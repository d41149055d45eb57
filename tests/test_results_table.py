"""The one table of an evaluation over several datasets and tasks."""
from unip_v2.engine.results_table import results_table


def test_one_row_per_dataset_and_evaluation_without_per_category_entries():
    table = results_table({
        "toy_shapes_val": {"bbox": {"AP": 50.062, "AP50": 77.2852, "AP-red circle": 65.9},
                           "segm": {"AP": 56.9332}},
        "toy_shapes_val_classification": {"classification": {"top1": 41.0, "top5": 96.0}},
        "toy_shapes_val_captioning": {"captioning": {"BLEU-4": 0.3123, "CIDEr": 0.912}},
    })
    assert table.splitlines() == [
        "| dataset                       | evaluation     | metrics                 |",
        "|:------------------------------|:---------------|:------------------------|",
        "| toy_shapes_val                | bbox           | AP 50.06, AP50 77.29    |",
        "| toy_shapes_val                | segm           | AP 56.93                |",
        "| toy_shapes_val_classification | classification | top1 41.00, top5 96.00  |",
        "| toy_shapes_val_captioning     | captioning     | BLEU-4 0.31, CIDEr 0.91 |",
    ]
