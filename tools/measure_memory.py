"""Peak resident memory of a command's main process and of each of its DataLoader workers.

    python tools/measure_memory.py [--interval 0.2] [--json OUT.json] -- python -m updown.fit --config ... \\
        --data.init_args.features_h5path /data/coco_36.h5 --data.init_args.num_workers 2 --trainer.max_steps 200

Runs the command and samples its process tree every ``--interval`` seconds (psutil, else /proc): for each
process, the peak RSS (resident set, what the OOM killer and ``top`` count, shared pages included), the peak
PSS (shared pages divided among the processes sharing them, so that the sum over processes is what the run
costs) and RSS over time, to show that it levels off. The command's process is "main" (run Python directly,
not through a shell script, or ``exec`` it there); its Python descendants are labelled "worker N" in order of
appearance (a run's Python children are its DataLoader workers: training, validation, prediction), others by
name (e.g. the java tokenizer of the COCO scorer). The page cache is
no process's memory: reading an 18 GB feature file fills it, and the kernel drops it when memory is needed.

Prints a markdown table; ``--json`` also writes every sample. Exits with the command's exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

try:
    import psutil
except ImportError:  # /proc is enough on Linux
    psutil = None

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _children(pid: int) -> list[int]:
    """Descendants of ``pid``, depth first."""
    if psutil is not None:
        try:
            return [child.pid for child in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return []
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            direct = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in direct:
            found += [child, *_children(child)]
    return found


def _memory(pid: int) -> tuple[int, int] | None:
    """``(rss, pss)`` in bytes, None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2 and parts[0].endswith(":"):
            values[parts[0][:-1]] = int(parts[1]) * 1024
    return values.get("Rss", 0), values.get("Pss", 0)


def _label(pid: int, labels: dict[int, str]) -> str:
    """ "worker N" for a Python child (a DataLoader worker: a fork of the main process), else its name."""
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        name = "?"
    if name.startswith("python") or name.startswith("pt_"):
        return f"worker {sum(label.startswith('worker') for label in labels.values()) + 1}"
    return f"{name} (pid {pid})"


def measure(command: list[str], interval: float, peaks: dict, samples: list) -> int:
    """Run ``command``, filling ``peaks`` (per process) and ``samples`` as it runs (so that an interrupted
    measurement still reports what it saw); returns the exit status."""
    process = subprocess.Popen(command)
    labels: dict[int, str] = {process.pid: "main"}
    start = time.monotonic()
    while True:
        pids = [process.pid, *_children(process.pid)]
        now = round(time.monotonic() - start, 2)
        sample = {"t": now}
        for pid in pids:
            if pid not in labels:
                labels[pid] = _label(pid, labels)
            memory = _memory(pid)
            if memory is None:
                continue
            label = labels[pid]
            peak = peaks.setdefault(label, {"pid": pid, "rss": 0, "pss": 0})
            peak["rss"], peak["pss"] = max(peak["rss"], memory[0]), max(peak["pss"], memory[1])
            sample[label] = memory[0]
        samples.append(sample)
        if process.poll() is not None:
            return process.returncode
        time.sleep(interval)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _mb(value: int) -> str:
    return f"{value / 2**20:,.0f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    parser.add_argument("--json", type=Path, help="also write the peaks and every sample here")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to measure after --")
    peaks: dict[str, dict[str, int]] = {}
    samples: list[dict] = []
    # A timeout or Ctrl-C ends the command too (same process group): report what was measured up to then.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        status = measure(command, args.interval, peaks, samples)
    except KeyboardInterrupt:
        status = 130
        print("\ninterrupted: the peaks below are those seen until then", file=sys.stderr)
    duration = samples[-1]["t"] if samples else 0.0
    main_rss = [(s["t"], s["main"]) for s in samples if "main" in s]
    print(f"\n`{' '.join(command)}`: exit status {status}, {duration:.0f} s, {len(samples)} samples.\n")
    print("| process | peak RSS (MiB) | peak PSS (MiB) |")
    print("|---|---:|---:|")
    for label, peak in peaks.items():
        print(f"| {label} | {_mb(peak['rss'])} | {_mb(peak['pss'])} |")
    if main_rss:
        # RSS of the main process at each tenth of the run: a bounded run levels off.
        marks = [main_rss[min(len(main_rss) - 1, round(k * (len(main_rss) - 1) / 10))] for k in range(11)]
        print("\nmain RSS (MiB) over the run: " + ", ".join(f"{t:.0f} s: {_mb(rss)}" for t, rss in marks))
    if args.json:
        args.json.write_text(
            json.dumps({"command": command, "status": status, "peaks": peaks, "samples": samples})
        )
    return status


if __name__ == "__main__":
    sys.exit(main())
