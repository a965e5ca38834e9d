"""What every benchmark records beside its numbers: when, where, and the command that produced them."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys

import torch


def run_meta() -> dict:
    meta = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "command": "python " + " ".join(sys.argv),
    }
    try:
        meta["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    return meta


def write_json(path: str | None, meta: dict, **results) -> None:
    if path:
        with open(path, "w") as f:
            json.dump({"meta": meta, **results}, f, indent=2)


def append_rows(path: str | None, lines: list[str]) -> None:
    """Append markdown table rows (to BENCHMARKS.md, or a file to merge into it)."""
    if path:
        with open(path, "a") as f:
            f.writelines(line + "\n" for line in lines)
