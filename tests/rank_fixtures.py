"""Evaluation on two gloo ranks under torchrun, for tests that compare it with one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

import torch

EVALUATE_SCRIPT = """
import json, sys, torch
from pathlib import Path
torch.set_num_threads(1)
from pgolf import config, dist
from pgolf.evaluate import evaluate
run_dir = Path(sys.argv[2])
for name, (over, mode) in json.loads(sys.argv[3]).items():
    cfg = config.load(sys.argv[1]).with_overrides(**over)
    evaluate(cfg, run_dir, mode=mode, checkpoint=run_dir / "model.pt", per_token_out=run_dir / f"{name}.npz",
             summary_name=f"{name}.json")
dist.shutdown()
"""


def evaluate_on_two_ranks(tmp_path: Path, state_dict: Mapping[str, torch.Tensor], cfg: Any,
                          runs: Mapping[str, tuple[Mapping[str, Any], str]]) -> Path:
    """Evaluate `state_dict` under `cfg` on 2 gloo ranks, once per {name: (overrides, mode)}; each run
    writes <name>.json and <name>.npz into the returned folder."""
    run_dir = tmp_path / "ranks2"
    run_dir.mkdir()
    torch.save(dict(state_dict), run_dir / "model.pt")
    (run_dir / "config.json").write_text(cfg.to_json())
    (tmp_path / "two.py").write_text(EVALUATE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(tmp_path / "two.py"), str(run_dir / "config.json"), str(run_dir), json.dumps(runs)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir
