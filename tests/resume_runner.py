"""tools/train_net.py's training, plus what tests/test_resume.py needs to watch and break it:

    python tests/resume_runner.py --losses FILE [--config FILE] [--resume] [--overwrite]
        [--die-after I] [--kill-in-save I] -- KEY VALUE ...

--losses: after every iteration, append {"iteration", "losses"} (the raw loss values of that
iteration, not metrics.json's medians, and the learning rate) to FILE.
--die-after I: exit with status 3 right after iteration I (and its checkpoint, if any).
--kill-in-save I: while the checkpoint of iteration I is being written, after half of its
bytes, the process kills itself with SIGKILL (a kill -9 in the middle of a write).
"""
import argparse
import io
import json
import os
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import train_net  # noqa: E402  (tools/train_net.py)

import torch  # noqa: E402

from detectron2.engine import HookBase  # noqa: E402

from unip_v2.engine import Trainer, checkpointer  # noqa: E402


class RecordLosses(HookBase):
    def __init__(self, path, die_after):
        self.path, self.die_after = path, die_after

    def after_step(self):
        storage = self.trainer.storage
        # values put this iteration (a multi-task run puts only the drawn task's losses)
        losses = {k: v for k, (v, it) in storage.latest().items() if it == self.trainer.iter
                  and (k.startswith("loss") or "/loss" in k or k in ("total_loss", "lr",
                                                                     "task_drawn"))}
        with open(self.path, "a") as f:
            f.write(json.dumps({"iteration": self.trainer.iter, "losses": losses}) + "\n")
        if self.trainer.iter == self.die_after:
            os._exit(3)


def kill_in_save_of(iteration):
    real_save = torch.save

    def save(data, f):
        if data.get("iteration") != iteration:
            return real_save(data, f)
        buffer = io.BytesIO()
        real_save(data, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    checkpointer.torch.save = save   # the checkpointer's module reference to torch


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--losses", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--die-after", type=int, default=None)
    parser.add_argument("--kill-in-save", type=int, default=None)
    parser.add_argument("--config", default="uni_perceiver_v2_R50_tiny.yaml",
                        help="a file of configs/toy")
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    ours = parser.parse_args()
    opts = ours.opts[1:] if ours.opts[:1] == ["--"] else ours.opts
    argv = ["--config-file", os.path.join(REPO, "configs", "toy", ours.config)]
    argv += ["--resume"] * ours.resume + ["--overwrite"] * ours.overwrite + opts
    args = train_net.get_parser().parse_args(argv)
    try:
        cfg = train_net.setup(args)
    except train_net.RunFolderInUseError as e:
        print(f"train_net: {e}", file=sys.stderr)
        sys.exit(2)
    if ours.kill_in_save is not None:
        kill_in_save_of(ours.kill_in_save)
    trainer = Trainer(cfg)
    trainer.register_hooks([RecordLosses(ours.losses, ours.die_after)])
    trainer.resume_or_load(resume=args.resume)
    trainer.train()


if __name__ == "__main__":
    main()
