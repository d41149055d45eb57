"""Several training processes: detectron2's `launch` (`--num-gpus N`: one process per GPU,
NCCL, spawned here) or processes that torchrun started (`torchrun --nproc-per-node N
tools/train_net.py ...`, on CPUs with gloo and across machines).

detectron2 0.6's `launch` spawns its own processes and needs CUDA; under torchrun the
processes exist already and their rank, world size and rendezvous are in the environment
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so they only
need the process group and detectron2's per-machine group (`comm.get_local_rank()`).
"""
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from detectron2.engine import launch as detectron2_launch
from detectron2.utils import comm

__all__ = ["init_torchrun_process_group", "launch", "started_by_torchrun"]


def started_by_torchrun() -> bool:
    """True in a process that torchrun (or another launcher setting its variables) started as
    one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_torchrun_process_group(device: str, timeout_minutes: int = 30) -> None:
    """The process group of a torchrun process: gloo for MODEL.DEVICE "cpu", NCCL for CUDA
    (each process on GPU LOCAL_RANK); then detectron2's per-machine group, one per
    LOCAL_WORLD_SIZE consecutive ranks (torchrun numbers the processes machine by machine)."""
    if dist.is_initialized():
        return
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if world % local_world:
        raise ValueError(f"WORLD_SIZE {world} is not a multiple of LOCAL_WORLD_SIZE {local_world}: "
                         "every machine must run the same number of processes")
    cuda = device.startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise RuntimeError(f"MODEL.DEVICE is {device!r} but CUDA is not available; train on "
                               "CPUs with MODEL.DEVICE cpu (gloo)")
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method="env://", rank=rank,
                            world_size=world, timeout=timedelta(minutes=timeout_minutes))
    # every process creates every group (new_group is collective), keeps its own machine's
    for machine in range(world // local_world):
        group = dist.new_group(list(range(machine * local_world, (machine + 1) * local_world)))
        if machine == rank // local_world:
            comm._LOCAL_PROCESS_GROUP = group   # detectron2's launch sets the same variable
    comm.synchronize()


def launch(main, args, device: str) -> None:
    """Run ``main(args)``: in torchrun's processes after `init_torchrun_process_group`, else
    through detectron2's launch (args.num_gpus processes per machine)."""
    if started_by_torchrun():
        if args.num_gpus != 1 or args.num_machines != 1:
            raise ValueError("under torchrun, the process count comes from torchrun "
                             "(--nproc-per-node, --nnodes): leave --num-gpus and "
                             "--num-machines at 1")
        init_torchrun_process_group(device)
        try:
            main(args)
        finally:
            dist.destroy_process_group()
        return
    detectron2_launch(main, args.num_gpus, num_machines=args.num_machines,
                      machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,))
