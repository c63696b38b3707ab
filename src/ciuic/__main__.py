"""``python -m ciuic report`` (or ``ciuic report``): run a training script with compression on for a
few steps, then print and save its memory report. The script is not changed.

    python -m ciuic report [--mode 4:1] [--steps 3] [--out DIR] train.py [script args ...]
    python -m ciuic report --budget 25% -m package.train [script args ...]

ciuic's options come before the script; everything after the script goes to it unchanged. The
script runs as ``__main__`` through ``ciuic_integrations._bootstrap`` (what ``ciuic-accelerate
launch --ciuic`` uses), with compression enabled for its main thread from ``--mode``. A training
pass is a root module's forward with grad enabled (evaluation forwards do not count). The first
``--warmup`` passes are left out of the report (pass 1 calibrates the bit plan); at the start of
pass ``--steps + 1`` the script is stopped (a ``BaseException`` the script's ``except Exception``
does not catch), the report is printed and ``DIR/ciuic_report.json`` and ``DIR/ciuic_report.png``
are written. A script that ends sooner is reported as it ended.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import warnings
from typing import Any

REPORT_JSON = "ciuic_report.json"
REPORT_PNG = "ciuic_report.png"


class _StopScript(BaseException):
    """Raised in the script after the requested passes (a BaseException: `except Exception` in
    the script does not swallow it)."""


class _PassWatcher:
    """Counts training passes of the main thread with global module hooks; resets the counters
    after the warm-up, stops the script after ``steps`` passes, shows a progress line."""

    def __init__(self, steps: int, warmup: int, progress: bool, stream: Any = None) -> None:
        self.steps = steps
        self.warmup = warmup
        self.progress = progress
        self.stream = stream or sys.stderr
        self.started = 0
        self.report: Any = None
        self.timeline: Any = None
        self.meta: dict = {}
        self._depth = 0
        self._thread = threading.get_ident()
        self._handles: list = []
        self._start = time.perf_counter()
        self._printed = False

    def install(self) -> None:
        # Registered before compression is enabled, so these hooks run before the engine's: the
        # stop happens before the engine begins another pass.
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self._handles = [register_module_forward_pre_hook(self._pre),
                         register_module_forward_hook(self._post, always_call=True)]

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        self._end_line()

    def _pre(self, module: Any, args: Any) -> None:
        if threading.get_ident() != self._thread:
            return
        if self._depth == 0:
            import torch

            import ciuic

            if torch.is_grad_enabled() and ciuic.is_enabled():
                self._begin_pass()
        self._depth += 1

    def _post(self, module: Any, args: Any, output: Any) -> None:
        if threading.get_ident() == self._thread and self._depth > 0:
            self._depth -= 1

    def _begin_pass(self) -> None:
        import ciuic

        self.started += 1
        if self.started > self.steps:
            self.finish()
            raise _StopScript()
        if self.started == self.warmup + 1:
            if self.warmup:
                ciuic.reset_stats()
            self._start_cuda()
        self._show()

    def _start_cuda(self) -> None:
        import torch

        if not torch.cuda.is_available():
            return
        torch.cuda.reset_peak_memory_stats()
        from .memory import CudaMemoryTimeline

        try:
            self.timeline = CudaMemoryTimeline().start()
        except Exception as error:  # the history API is private to torch: never fail the run for it
            warnings.warn(f"ciuic report: no CUDA memory timeline ({error})", RuntimeWarning)
            self.timeline = None

    def finish(self) -> Any:
        """The report of what was counted (made once)."""
        if self.report is None:
            from .report import memory_report

            timeline = self.timeline
            try:
                self.report = memory_report(timeline=timeline)
            except Exception as error:
                warnings.warn(f"ciuic report: no CUDA memory timeline ({error})", RuntimeWarning)
                self.report = memory_report()
            self.report.meta.update(self.meta)
            self.report.meta["passes_run"] = min(self.started, self.steps)
        return self.report

    def _show(self) -> None:
        if not self.progress:
            return
        import ciuic

        st = ciuic.stats()
        phase = "warm-up" if self.started <= self.warmup else "measured"
        text = (f"ciuic report: training pass {self.started}/{self.steps} ({phase}), "
                f"{time.perf_counter() - self._start:.1f}s")
        if st.bytes_before:
            text += f" | kept so far {_size(st.bytes_after)} of {_size(st.bytes_before)} (ratio {st.ratio:.2f})"
        if self.stream.isatty():
            self.stream.write("\r" + text.ljust(100)[:max(100, len(text))])
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._printed = True

    def _end_line(self) -> None:
        if self._printed and self.stream.isatty():
            self.stream.write("\n")
            self.stream.flush()
        self._printed = False


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _report_parser(subparsers: Any = None) -> argparse.ArgumentParser:
    kwargs = dict(
        description="Run a training script with ciuic compression on for a few training passes, then print "
                    "the memory report (per-module bytes kept for backward, codecs, bits, budget) and save "
                    f"it as {REPORT_JSON} and {REPORT_PNG}. ciuic's options come before the script; "
                    "everything after the script is passed to it.",
        usage="%(prog)s [options] (script.py | -m module) [script args ...]",
    )
    parser = subparsers.add_parser("report", help="memory report of a training script", **kwargs) \
        if subparsers is not None else argparse.ArgumentParser(prog="ciuic report", **kwargs)
    parser.add_argument("--mode", default=None,
                        help="lossless, 2:1, 4:1 (default), 8:1, auto (with --budget), or a JSON object of "
                             "ciuic.CompressionConfig options, e.g. '{\"mode\": \"8:1\", \"group_size\": 64}'")
    parser.add_argument("--budget", default=None,
                        help="for mode auto: bytes per pass ('6GB', '512MiB', an int) or a fraction of the "
                             "uncompressed size ('25%%'); implies --mode auto when --mode is not given")
    parser.add_argument("--steps", type=int, default=3,
                        help="stop the script after this many training passes (forwards with grad); default 3")
    parser.add_argument("--warmup", type=int, default=None,
                        help="passes left out of the report (pass 1 calibrates the bit plan); "
                             "default 1, or 0 with --steps 1")
    parser.add_argument("--out", default="ciuic_report",
                        help=f"folder for {REPORT_JSON} and {REPORT_PNG} (default ./ciuic_report)")
    parser.add_argument("--top", type=int, default=None, help="print only the TOP modules keeping the most")
    parser.add_argument("--depth", type=int, default=None,
                        help="print modules merged by the first DEPTH parts of their names (e.g. 3: "
                             "model.layers.0); the saved JSON keeps every module")
    parser.add_argument("--no-plot", action="store_true", help=f"do not write {REPORT_PNG}")
    parser.add_argument("--no-progress", action="store_true", help="no progress line")
    parser.add_argument("-m", "--module", action="store_true",
                        help="the script is a module name, run as `python -m module`")
    parser.add_argument("script", help="the training script (or module name with -m)")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    parser.set_defaults(func=run_report)
    return parser


def _config(args: argparse.Namespace) -> Any:
    from ciuic_integrations._common import resolve_config

    mode = args.mode
    options: dict = {}
    if args.budget is not None:
        options["budget"] = args.budget
        if mode is None:
            mode = "auto"
    try:
        config = resolve_config("4:1" if mode is None else mode, options or None)
    except ValueError as error:
        raise SystemExit(f"ciuic report: error: {error}") from None
    if config is None:
        raise SystemExit(f"ciuic report: error: --mode {args.mode!r} turns compression off; allowed: "
                         "lossless, 2:1, 4:1, 8:1, auto (with --budget), or a JSON object of options")
    return config


def run_report(args: argparse.Namespace) -> int:
    """Run ``args.script`` under compression and write its report; returns the exit status."""
    if args.steps < 1:
        raise SystemExit(f"ciuic report: error: --steps {args.steps} is not valid; allowed: an int >= 1")
    warmup = (1 if args.steps > 1 else 0) if args.warmup is None else args.warmup
    if not 0 <= warmup < args.steps:
        raise SystemExit(f"ciuic report: error: --warmup {warmup} is not valid; allowed: 0 <= warmup < --steps "
                         f"({args.steps})")
    if args.top is not None and args.top < 1:
        raise SystemExit(f"ciuic report: error: --top {args.top} is not valid; allowed: an int >= 1")
    if args.depth is not None and args.depth < 1:
        raise SystemExit(f"ciuic report: error: --depth {args.depth} is not valid; allowed: an int >= 1")
    config = _config(args)

    import ciuic
    from ciuic_integrations import _bootstrap
    from ciuic_integrations._common import ENV_MODE, setting_for_env

    from .memory import configure_allocator

    os.environ[ENV_MODE] = setting_for_env(config)
    configure_allocator(config)  # before the script can initialise CUDA
    ciuic.reset_stats()
    watcher = _PassWatcher(args.steps, warmup, progress=not args.no_progress)
    watcher.meta = {"mode": config.mode, "budget": config.budget, "script": args.script,
                    "script_args": list(args.script_args), "steps": args.steps, "warmup": warmup}
    target = ["-m", args.script] if args.module else [args.script]
    status = 0
    failure = None
    argv0 = list(sys.argv)
    watcher.install()
    try:
        _bootstrap.main(target + list(args.script_args))
    except _StopScript:
        pass
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if exit_.code not in (None, 0) and not isinstance(exit_.code, int):
            print(exit_.code, file=sys.stderr)
    except KeyboardInterrupt:
        status, failure = 130, "interrupted"
    except Exception as error:  # the script failed: report what ran, then show its error
        import traceback

        traceback.print_exc()
        status, failure = 1, f"{type(error).__name__}: {error}"
    finally:
        watcher.remove()
        sys.argv = argv0
    report = watcher.finish()
    if failure:
        report.meta["script_error"] = failure
    shown = report.grouped(args.depth) if args.depth else report
    print(shown.summary() + "\n\n" + shown.table(top=args.top) if report.rows else str(report))
    if watcher.started < args.steps:
        print(f"\nciuic report: the script ran {watcher.started} training pass(es) under compression, "
              f"fewer than --steps {args.steps}", file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    written = [report.to_json(os.path.join(args.out, REPORT_JSON))]
    if not args.no_plot:
        try:
            written.append(report.plot(os.path.join(args.out, REPORT_PNG)))
        except ImportError as error:
            print(f"ciuic report: no plot: {error}", file=sys.stderr)
    print("ciuic report: wrote " + ", ".join(written), file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m ciuic`` and the ``ciuic`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "ciuic" if os.path.basename(sys.argv[0] or "") == "ciuic" else "python -m ciuic"
    parser = argparse.ArgumentParser(prog=prog, description="ciuic: compressed activations for PyTorch training.")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    _report_parser(subparsers)
    if not argv:
        parser.print_help()
        return 2
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
