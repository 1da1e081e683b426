"""Run the toy method with the Pretrainer in its own process (plain or under torchrun).

Usage: python _engine_toy_run.py OUT_DIR MAX_STEPS CKPT_EVERY SLEEP
Writes OUT_DIR/summary_rank<r>.json, seen_rank<r>.json (sample indices) and params_rank<r>.json.
"""

import json
import logging
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _engine_toy import BlobVolumes, ToyMethod  # noqa: E402

from medssl3d.engine.trainer import Pretrainer  # noqa: E402

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    out_dir, max_steps, ckpt_every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    sleep = float(sys.argv[4])
    torch.manual_seed(0)
    method = ToyMethod(record=True, sleep=sleep)
    trainer = Pretrainer(
        method, BlobVolumes(n=8), max_steps=max_steps, batch_size=2, ckpt_every=ckpt_every,
        log_every=1, out_dir=out_dir, deterministic=True, tensorboard=False,
    )
    rank = int(os.environ.get("RANK", "0"))
    summary = trainer.run()
    Path(out_dir, f"summary_rank{rank}.json").write_text(json.dumps(summary))
    Path(out_dir, f"seen_rank{rank}.json").write_text(json.dumps(method.seen))
    sums = {k: float(v.double().sum()) for k, v in method.state_dict().items() if v.is_floating_point()}
    Path(out_dir, f"params_rank{rank}.json").write_text(json.dumps(sums))
