"""A run directory's log: ``resolved_config.yaml``, ``metrics.jsonl`` (one JSON record per line,
each with its iteration ``it``) and, optionally, Weights & Biases. Only rank 0 writes: on the
other ranks a RunLog does nothing."""
from __future__ import annotations

import json
import os
import uuid
from typing import Any

import yaml

from pipeline.durable import output_error


class RunLog:
    def __init__(self, out_dir: str, enabled: bool = True) -> None:
        self.out_dir, self.enabled = out_dir, enabled
        self.metrics_path = os.path.join(out_dir, 'metrics.jsonl')
        self.wandb: Any = None

    def start(self, resolved: dict[str, Any], it: int) -> None:
        """Create the directory, write the resolved config, and drop the records of iterations
        after ``it`` (a resumed run redoes them)."""
        if not self.enabled:
            return
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, 'resolved_config.yaml'), 'w') as f:
            yaml.safe_dump(resolved, f, sort_keys=False)
        if os.path.exists(self.metrics_path):
            with open(self.metrics_path) as f:
                keep = [line for line in f if line.strip() and json.loads(line)['it'] <= it]
            with open(self.metrics_path, 'w') as f:
                f.writelines(keep)

    def start_wandb(self, run_id: str | None, resolved: dict[str, Any]) -> str | None:
        """Log to Weights & Biases too, resuming ``run_id``; returns the run's id. Raises
        ImportError naming the package when wandb is not installed."""
        if not self.enabled:
            return run_id
        try:
            import wandb
        except ImportError:
            raise ImportError('--wandb needs the wandb package (pip install wandb)') from None
        run_id = run_id or uuid.uuid4().hex[:8]
        wandb.init(project='srt-shards', name=self.out_dir, id=run_id, resume='allow',
                   config=resolved)
        self.wandb = wandb
        return run_id

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with open(self.metrics_path, 'a') as f:
                f.write(json.dumps(record) + '\n')
        except OSError as e:  # a full or read-only disk: named, as a checkpoint's
            raise output_error(e, self.metrics_path, 'metrics.jsonl') or e
        if self.wandb is not None:
            self.wandb.log(record, step=record['it'])
