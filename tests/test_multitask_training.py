"""Multi-task training (Uni-Perceiver v2, Sec. 4.4): the unmixed task sampler, the sampling
ratios and weights of Table 8, the resumable multi-task loader, and two gloo processes that
train a two-task model together (the same task on both every iteration, identical parameters,
retrieval's negatives gathered from the other process)."""
import math
import os
import socket

import pytest
import torch

import unip_v2  # noqa: F401  first: makes detectron2 importable

from unip_v2.data.build import IndexStream, ResumableTrainLoader
from unip_v2.data.multitask import (MultiTaskTrainLoader, TaskDataset, TaskSampler,
                                    sampling_ratios, task_dataset_weights)

from toy_data import make_toy_data


# ------------------------------------------------------------------------------ the sampler
def test_the_task_of_an_iteration_depends_on_seed_and_iteration_only():
    ratios = [0.5, 0.3, 0.2]
    forward = [TaskSampler(ratios, 11)(i) for i in range(300)]
    backward = [TaskSampler(ratios, 11)(i) for i in reversed(range(300))][::-1]
    one = TaskSampler(ratios, 11)
    shuffled = {i: one(i) for i in torch.randperm(300, generator=torch.Generator()
                                                  .manual_seed(0)).tolist()}
    assert forward == backward == [shuffled[i] for i in range(300)]
    assert forward != [TaskSampler(ratios, 12)(i) for i in range(300)]   # the seed matters
    assert set(forward) == {0, 1, 2}


def test_the_draws_follow_the_sampling_ratios_chi_square():
    from scipy.stats import chi2

    ratios = [0.25, 0.05, 0.1, 0.3, 0.3]       # Table 8's group ratios (det, mlm, cls, cap, ret)
    n = 10_000
    sampler = TaskSampler(ratios, 2024)
    counts = torch.bincount(torch.tensor([sampler(i) for i in range(n)]), minlength=5)
    expected = torch.tensor(ratios, dtype=torch.float64) * n
    stat = float(((counts - expected) ** 2 / expected).sum())
    assert chi2.sf(stat, df=len(ratios) - 1) > 1e-3, (counts.tolist(), stat)


def test_ratios_and_weights_follow_table_8():
    # default: tasks equal, split by the square root of the dataset sizes
    tasks, sizes = ["cls", "cap", "cap"], [100, 900, 100]
    r = sampling_ratios(tasks, sizes)
    assert r == pytest.approx([1 / 2, 1 / 2 * 30 / 40, 1 / 2 * 10 / 40])
    # given ratios are normalised
    assert sampling_ratios(tasks, sizes, [2, 1, 1]) == pytest.approx([0.5, 0.25, 0.25])
    # w_k = w_task x s_k / s_task: Table 8's YFCC caption weight 0.5 x 0.09831 / 0.3
    w = task_dataset_weights(["cap", "cap", "mlm"], [0.09831, 0.20169, 0.05],
                             {"cap": 0.5, "mlm": 0.5})
    assert w == pytest.approx([0.16385, 0.5 * 0.20169 / 0.3, 0.5])
    with pytest.raises(ValueError, match="one per dataset"):
        sampling_ratios(tasks, sizes, [1, 1])


# ------------------------------------------------------------------------------ the loader
def _loader(seed, mode="unmixed"):
    """Three task-datasets over integer 'datasets' whose mapper tags each element."""
    tds, loaders = [], []
    for k, (size, batch, ratio) in enumerate([(7, 2, 0.5), (5, 3, 0.3), (11, 1, 0.2)]):
        dataset = list(range(100 * k, 100 * k + size))
        loaders.append(ResumableTrainLoader(dataset, lambda x: {"x": x}, IndexStream(size, k),
                                            batch))
        tds.append(TaskDataset(f"t{k}", f"d{k}", f"t{k}", ratio, 1.0))
    return MultiTaskTrainLoader(tds, loaders, seed, mode)


def _take(loader, n):
    it = iter(loader)
    out = []
    for _ in range(n):
        b = next(it)
        out.append((b.index, [x["x"] for x in b.inputs]))
    return out


def test_the_loader_draws_by_the_sampler_and_resumes_exactly():
    whole = _take(_loader(5), 40)
    sampler = TaskSampler([0.5, 0.3, 0.2], 5)
    assert [k for k, _ in whole] == [sampler(i) for i in range(40)]
    # each task-dataset's batches continue its own stream, whatever the others drew
    for k, (size, batch) in enumerate([(7, 2), (5, 3), (11, 1)]):
        mine = [x for j, xs in whole if j == k for x in xs]
        stream = IndexStream(size, k)
        assert mine == [100 * k + stream[p] for p in range(len(mine))]
    first = _loader(5)
    head = _take(first, 17)
    state = first.state_dict()
    resumed = _loader(5)
    resumed.load_state_dict(state)
    assert head + _take(resumed, 23) == whole
    assert resumed.times_drawn == [sum(1 for k, _ in whole if k == j) for j in range(3)]


def test_mixed_sampling_gives_every_task_each_iteration():
    it = iter(_loader(5, "mixed"))
    for _ in range(3):
        assert [b.index for b in next(it)] == [0, 1, 2]


def test_a_checkpoint_of_other_task_datasets_is_refused():
    state = _loader(5).state_dict()
    state["labels"] = ["t0", "t2", "t1"]
    with pytest.raises(ValueError, match="same DATASETS.TRAIN"):
        _loader(5).load_state_dict(state)


# ------------------------------------------------------------------------ two processes
WORLD, ITERS = 2, 4
TASKS = ["retrieval", "mlm"]
DATASETS = ("toy_shapes_train_retrieval", "toy_shapes_train_mlm")


def _seed_drawing_both_tasks():
    """The first SEED whose first ITERS iterations draw both task-datasets (equal ratios), a
    retrieval iteration among the first two."""
    for seed in range(1000):
        draws = [TaskSampler([0.5, 0.5], seed)(i) for i in range(ITERS)]
        if set(draws) == {0, 1} and 0 in draws[:2]:
            return seed
    raise AssertionError("no seed draws both tasks")


def _worker(rank, port, out_dir, datasets_dir, tokenizer, seed):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DETECTRON2_DATASETS=datasets_dir)
    import torch.distributed as dist
    from detectron2.config import get_cfg
    from detectron2.engine import HookBase
    from detectron2.utils.env import seed_all_rng

    from unip_v2 import add_unip_v2_config
    from unip_v2.data.datasets import register_toy_shapes_tasks
    from unip_v2.engine import Trainer
    from unip_v2.engine.launch import init_torchrun_process_group
    from unip_v2.modeling.tasks import retrieval

    register_toy_shapes_tasks()   # under $DETECTRON2_DATASETS set above
    init_torchrun_process_group("cpu")
    seen = []
    original = retrieval.contrastive_losses

    def recording(image_feats, text_feats, scale, label_smoothing=0.0, gather=True):
        out = original(image_feats, text_feats, scale, label_smoothing, gather)
        seen.append({"img": image_feats.detach().clone(), "txt": text_feats.detach().clone(),
                     "scale": float(scale), "eps": label_smoothing, "gather": gather,
                     "losses": [float(x) for x in out]})
        return out

    retrieval.contrastive_losses = recording
    records = []

    class Record(HookBase):
        def after_step(self):
            params = self.trainer.model.module.parameters()
            records.append({"times_drawn": list(self.trainer.data_loader.times_drawn),
                            "checksum": sum(float(p.detach().double().sum()) for p in params)})

    try:
        cfg = get_cfg()
        add_unip_v2_config(cfg)
        cfg.merge_from_file(os.path.join(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))), "configs", "toy", "multitask_R50_tiny.yaml"))
        cfg.merge_from_list([
            "MODEL.TASKS", str(TASKS), "DATASETS.TRAIN", str(DATASETS), "DATASETS.TEST", "()",
            "DATALOADER.SAMPLING_RATIOS", "[0.5, 0.5]",
            "MODEL.TEXT_ENCODER.TOKENIZER", tokenizer, "MODEL.RETRIEVAL.BATCH_SIZE", "2",
            "MODEL.RETRIEVAL.IMAGE_SIZE", "64", "MODEL.MLM.BATCH_SIZE", "2",
            "SOLVER.OPTIMIZER", "MT-ADAMW", "SOLVER.MAX_ITER", str(ITERS),
            "SOLVER.CHECKPOINT_PERIOD", "100", "SOLVER.WARMUP_ITERS", "1",
            "TEST.EVAL_PERIOD", "0", "SEED", str(seed), "OUTPUT_DIR", out_dir])
        cfg.freeze()
        seed_all_rng(seed + rank)      # default_setup's per-process seeding
        trainer = Trainer(cfg)
        trainer.register_hooks([Record()])
        trainer.train()
        torch.save({"records": records, "seen": seen,
                    "params": {k: v.detach().clone() for k, v in
                               trainer.model.module.named_parameters()}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _info_nce(img, txt, scale, eps, rows):
    """float64 symmetric InfoNCE of the queries ``rows`` against all pairs (the oracle)."""
    img = torch.nn.functional.normalize(img.double(), dim=-1)
    txt = torch.nn.functional.normalize(txt.double(), dim=-1)
    labels = torch.arange(len(img))[rows]
    f = torch.nn.functional.cross_entropy
    return (float(f(scale * img[rows] @ txt.T, labels, label_smoothing=eps)),
            float(f(scale * txt[rows] @ img.T, labels, label_smoothing=eps)))


def test_two_gloo_processes_train_the_same_task_and_stay_identical(tmp_path_factory):
    datasets_dir, _, tokenizer = make_toy_data(tmp_path_factory, num_train=8, num_val=2)
    out = tmp_path_factory.mktemp("two_processes")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    seed = _seed_drawing_both_tasks()
    # fork: a spawned process would import everything again; a worker that raises makes
    # start_processes raise here
    torch.multiprocessing.start_processes(
        _worker, args=(port, str(out), datasets_dir, tokenizer, seed), nprocs=WORLD,
        start_method="fork")
    res = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
    # every iteration, both processes drew the same task-dataset (and both were drawn)
    draws = [[r["times_drawn"] for r in x["records"]] for x in res]
    assert len(draws[0]) == ITERS and draws[0] == draws[1]
    assert draws[0][-1] == [sum(TaskSampler([0.5, 0.5], seed)(i) == k for i in range(ITERS))
                            for k in range(2)]
    assert min(draws[0][-1]) >= 1
    # the parameters stay identical across the processes, and they moved
    for name, p in res[0]["params"].items():
        assert torch.equal(p, res[1]["params"][name]), name
    sums = [r["checksum"] for r in res[0]["records"]]
    assert len(set(sums)) == ITERS
    # retrieval's negatives came from both processes: each process's losses are the float64
    # InfoNCE of its own queries against the 2 x 2 gathered pairs, not of its own 2 pairs
    n_ret = draws[0][-1][0]
    assert len(res[0]["seen"]) == len(res[1]["seen"]) == n_ret
    for j in range(n_ret):
        img = torch.cat([res[r]["seen"][j]["img"] for r in range(WORLD)])
        txt = torch.cat([res[r]["seen"][j]["txt"] for r in range(WORLD)])
        for r in range(WORLD):
            call = res[r]["seen"][j]
            assert call["gather"]
            rows = slice(2 * r, 2 * r + 2)
            gathered = _info_nce(img, txt, call["scale"], call["eps"], rows)
            local = _info_nce(call["img"], call["txt"], call["scale"], call["eps"], slice(0, 2))
            assert call["losses"] == pytest.approx(gathered, rel=1e-5)
            assert not all(math.isclose(a, b, rel_tol=1e-3) for a, b in zip(call["losses"],
                                                                               local))
