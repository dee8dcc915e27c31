"""Train one adapter from a saved memory and head, in its own process, so that the peak memory
measured (VmHWM) is the tenant's training alone: head + adapter + memory, no model."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import torch

from pema.adapter import AdapterConfig, PemaAdapter, save_adapter
from pema.head import LMHead, load_head
from pema.memory import Memory
from pema.process import peak_rss_bytes
from pema.training import TrainConfig, train_adapter


def exit_with_parent() -> None:
    """Stop when the benchmark that started this cell is gone: a killed run must not leave a
    training process holding a core (one did, for an hour, skewing every later figure)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--train-memory", required=True)
    p.add_argument("--valid-memory", required=True)
    p.add_argument("--head", required=True)
    p.add_argument("--adapter-config", required=True, help="JSON of AdapterConfig fields")
    p.add_argument("--train-config", required=True, help="JSON of TrainConfig fields")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    exit_with_parent()
    torch.set_num_threads(2)
    rss_before = peak_rss_bytes()
    head = LMHead(load_head(args.head))
    train_mem, valid_mem = Memory.load(args.train_memory), Memory.load(args.valid_memory)
    adapter = PemaAdapter(AdapterConfig(**json.loads(args.adapter_config)))
    cfg = TrainConfig(**json.loads(args.train_config))
    report = train_adapter(adapter, head, train_mem, valid_mem, cfg)
    save_adapter(adapter, args.out)
    epochs = sum(p.epochs_run for p in report.phases.values())
    json.dump(
        {
            "train_seconds": round(report.seconds, 2),
            "seconds_per_epoch": round(report.seconds / max(epochs, 1), 2),
            "epochs_run": {str(k): v.epochs_run for k, v in report.phases.items()},
            "steps": {str(k): v.steps for k, v in report.phases.items()},
            "peak_rss_bytes": peak_rss_bytes(),
            "startup_rss_bytes": rss_before,
            "memory_bytes": train_mem.nbytes + valid_mem.nbytes,
            "valid": report.valid,
        },
        sys.stdout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
