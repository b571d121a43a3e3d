"""Training stage: `train(cfg, run_dir, resume=False) -> TrainResult`, the same on every rank.

    loop.py        setup, priming, the step loop, finish (the story)
    schedule.py    LR multiplier (wallclock + iteration warmdown), batch layout
    validate.py    periodic val loss / exact val_bpb on non-overlapping rows
    state.py       EMA, exported weights, resumable checkpoint
    runlog.py      train.log + metrics.jsonl, atomic writes
"""

from pgolf.dist import DistContext, distributed_context
from pgolf.train.loop import TrainResult, train
from pgolf.train.runlog import RunLog
from pgolf.train.state import check_fits

__all__ = ["DistContext", "RunLog", "TrainResult", "check_fits", "distributed_context", "train"]
