"""Run a training script with activation compression on, without changing the script.

    CIUIC_MODE=4:1 python -m ciuic_integrations._bootstrap train.py [args]
    CIUIC_MODE=4:1 python -m ciuic_integrations._bootstrap -m package.train [args]

Launchers (``ciuic-accelerate launch --ciuic``) start each process like this. Compression is turned
on for the main thread from ``CIUIC_MODE``, then the script runs as ``__main__`` with the argv, path
and ``__file__`` it would have had under ``python train.py``. When ``CIUIC_STATS_DIR`` is set, the
process writes its accounting to ``$CIUIC_STATS_DIR/ciuic_stats_rank<RANK>.json`` and its memory
report to ``ciuic_report.json`` / ``.png`` (``ciuic_report_rank<RANK>.*`` with several processes;
see ``ciuic.report.write_report``) at the end (also after an error), and the process of rank 0
prints one line about the memory saved.
"""

from __future__ import annotations

import dataclasses
import json
import os
import runpy
import sys

USAGE = "usage: python -m ciuic_integrations._bootstrap (script.py | -m module) [args ...]"


def _rank() -> int:
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "LOCAL_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def _write_stats(directory: str, config: object) -> None:
    import ciuic

    os.makedirs(directory, exist_ok=True)
    rank = _rank()
    record = {
        "rank": rank,
        "world_size": int(os.environ.get("WORLD_SIZE", "1") or 1),
        "pid": os.getpid(),
        "config": dataclasses.asdict(config),
        "stats": ciuic.stats().to_dict(),
    }
    path = os.path.join(directory, f"ciuic_stats_rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1, default=str)
    os.replace(path + ".tmp", path)
    from ciuic.report import write_report

    # the same report as `python -m ciuic report`: ciuic_report.json + .png (per rank when several)
    write_report(directory, rank=rank, world_size=record["world_size"])


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    as_module = bool(argv) and argv[0] == "-m"
    if as_module:
        argv = argv[1:]
    if not argv:
        raise SystemExit(USAGE)
    target, script_args = argv[0], argv[1:]

    import ciuic

    from ._common import config_from_env, describe, ENV_STATS_DIR

    config = config_from_env()
    if config is not None:
        ciuic.enable_compression(config)
    from ._optim import optimizer_from_env

    optimizer, fuse_update = optimizer_from_env()  # CIUIC_OPTIM / CIUIC_FUSE_UPDATE (--ciuic_optim)
    if optimizer is not None or fuse_update:
        from .accelerate import patch_accelerator

        patch_accelerator(optimizer, fuse_update)
    stats_dir = os.environ.get(ENV_STATS_DIR)
    try:
        if as_module:
            sys.argv = [target, *script_args]  # run_module puts the module's path in argv[0]
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.argv = [target, *script_args]
            # As `python script.py`: the script's folder (not the working directory) leads sys.path.
            sys.path[0] = os.path.dirname(os.path.abspath(target))
            # Absolute, as `python script.py` sets __file__ (argv[0] follows it here).
            runpy.run_path(os.path.abspath(target), run_name="__main__")
    finally:
        if config is not None:
            if stats_dir:
                _write_stats(stats_dir, config)
            if _rank() == 0:
                print(describe(ciuic.stats()), file=sys.stderr)
            ciuic.disable_compression()


if __name__ == "__main__":
    main()
