"""Ahead-of-time kernel report: every Triton kernel of ``ciuic_kernels`` compiled for real GPUs, on any machine.

No GPU is needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs the whole
pipeline (TTIR, TTGIR, LLVM IR, PTX) and Triton's bundled ``ptxas`` makes the cubin. For every
kernel, every configuration its launcher can pick and every target (sm_80 = A100, sm_90 = H100)
the report records:

* ``registers``, ``spill_store_bytes``/``spill_load_bytes``, ``stack_bytes`` (from ``ptxas -v`` on the
  PTX, with the same flags Triton uses) and ``shared_bytes`` (Triton's metadata);
* the global memory accesses of one program, from the TTIR ``tt.load``/``tt.store`` ops (shape and
  element type; an access inside an ``scf.for`` with constant bounds counts once per iteration, a
  loop with run-time bounds is a report error), and ``bytes_per_element`` = their bytes / the
  elements one program handles;
* vectorisation: the ``ld.global``/``st.global`` instructions of the PTX by width. The *main*
  accesses are the per-element ones (tiles at least 1/8 the size of the largest one; per-group
  metadata is smaller); they are vectorised when the PTX moves at least their bits per thread in
  64- or 128-bit instructions (``.v2``/``.v4``, ``.b64``).

Discovery convention (kept exactly, other modules rely on it): every module of ``ciuic_kernels``
that defines ``@triton.jit`` kernels defines ``AOT_CONFIGS``, a list (or a zero-argument function
returning one) of dicts: ``kernel`` (the jit function), ``signature`` (argument name -> Triton type
string: ``"*fp32"``, ``"*u8"``, ``"i32"``, ``"fp32"``, ``"constexpr"``), ``constexprs`` (name ->
value), ``name`` (a readable label), optionally ``num_warps``, ``enable_fp_fusion`` / ``options``
(compile options), ``divisible`` (integer arguments compiled as multiples of 16, the variant
Triton's run-time specialisation picks when they are), ``elements`` (input elements per program,
all its loop iterations together; default: the largest tile),
``pair`` (label(s) joining an encode with its decode) and ``min_bytes_per_element`` (the one-pass
minimum of the pair). Every ``JITFunction`` a module defines must be a configured kernel or be
called (directly or not) by one; otherwise the report fails.

    python benchmarks/kernels.py                  # all configs, sm_80 + sm_90: results/kernels_sm{80,90}.json
    python benchmarks/kernels.py --quick          # every constexpr value once, not every combination (CI)
    python benchmarks/kernels.py --markdown       # also print the BENCHMARKS.md table
    python benchmarks/kernels.py --only optim_state   # recompile one module's kernels, replace its rows
                                                      # in the saved JSON (recorded under "updates")

Exit status 1 when a kernel fails to compile, spills, has an unvectorised main access, or is not
covered by ``AOT_CONFIGS``. Must run with ``TRITON_INTERPRET`` unset (the interpreter replaces jit
functions); the test runs it in a subprocess.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import datetime
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
TARGETS = (80, 90)
_OPTION_KEYS = ("num_warps", "num_stages", "enable_fp_fusion")
_ELEMENT_BITS = {"i1": 8, "i8": 8, "u8": 8, "i16": 16, "f16": 16, "bf16": 16, "i32": 32, "f32": 32, "i64": 64, "f64": 64}


# ----------------------------------------------------------------------------------------- discovery


def _kernel_modules():
    import ciuic_kernels

    modules = []
    for info in pkgutil.iter_modules(ciuic_kernels.__path__):
        modules.append(importlib.import_module(f"ciuic_kernels.{info.name}"))
    return modules


def _jit_functions(module):
    from triton.runtime.jit import JITFunction

    return {
        name: value
        for name, value in vars(module).items()
        if isinstance(value, JITFunction) and value.fn.__module__ == module.__name__
    }


def _callees(jit_fn):
    """JIT functions a jit function calls, resolved through its globals (``name(...)`` / ``mod.name(...)``)."""
    from triton.runtime.jit import JITFunction

    found = []
    for node in ast.walk(ast.parse(jit_fn.src)):
        if not isinstance(node, ast.Call):
            continue
        target = node.func
        if isinstance(target, ast.Name):
            value = jit_fn.fn.__globals__.get(target.id)
        elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
            value = getattr(jit_fn.fn.__globals__.get(target.value.id), target.attr, None)
        else:
            continue
        if isinstance(value, JITFunction):
            found.append(value)
    return found


def discover(quick: bool | str = False):
    """(configs, defined, uncovered): every AOT config, every jit function, those no config reaches.

    ``quick``: False = every configuration; True = a covering subset (``_quick_subset``);
    ``"kernels"`` = one configuration per kernel."""
    from triton.runtime.jit import JITFunction

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("run the kernel report with TRITON_INTERPRET unset: the interpreter replaces jit functions")
    configs, defined = [], {}
    for module in _kernel_modules():
        jits = _jit_functions(module)
        for name, fn in jits.items():
            defined[f"{module.__name__}.{name}"] = fn
        aot = getattr(module, "AOT_CONFIGS", None)
        if aot is None:
            continue
        entries = aot() if callable(aot) else aot
        for entry in entries:
            missing = {"kernel", "signature", "constexprs", "name"} - set(entry)
            if missing:
                raise ValueError(f"{module.__name__}.AOT_CONFIGS entry {entry.get('name')!r} lacks {sorted(missing)}")
            if not isinstance(entry["kernel"], JITFunction):
                raise TypeError(f"{module.__name__}.AOT_CONFIGS entry {entry['name']!r}: kernel is not a @triton.jit function")
            configs.append(dict(entry, module=module.__name__))
    reached, stack = set(), [c["kernel"] for c in configs]
    while stack:
        fn = stack.pop()
        if id(fn) in reached:
            continue
        reached.add(id(fn))
        stack.extend(_callees(fn))
    uncovered = sorted(name for name, fn in defined.items() if id(fn) not in reached)
    if quick == "kernels":
        configs = _one_per_kernel(configs)
    elif quick:
        configs = _quick_subset(configs)
    return configs, defined, uncovered


def _one_per_kernel(configs):
    """The first configuration of every kernel (a second target's smoke check in CI)."""
    seen, chosen = set(), []
    for c in configs:
        if id(c["kernel"]) not in seen:
            seen.add(id(c["kernel"]))
            chosen.append(c)
    return chosen


def _quick_subset(configs):
    """A covering subset for CI: every kernel, and every value of every constexpr and argument type
    of a kernel at least once (greedy, in AOT_CONFIGS order), not every combination."""
    chosen, seen = [], set()
    for c in configs:
        kernel = (c["module"], c["kernel"].__name__)
        features = {(kernel, "kernel")}
        features |= {(kernel, "constexpr", k, repr(v)) for k, v in c["constexprs"].items()}
        features |= {(kernel, "type", k, t) for k, t in c["signature"].items()}
        if features - seen:
            seen |= features
            chosen.append(c)
    return chosen


# ----------------------------------------------------------------------------------------- compile


def _ptxas_stats(ptx: str, arch: int, fp_fusion: bool) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas, "-lineinfo", *([] if fp_fusion else ["--fmad=false"]), "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(tmp, "k.o")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr

    def grab(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    return {
        "registers": grab(r"Used (\d+) registers"),
        "spill_store_bytes": grab(r"(\d+) bytes spill stores"),
        "spill_load_bytes": grab(r"(\d+) bytes spill loads"),
        "stack_bytes": grab(r"(\d+) bytes stack frame"),
    }


_TTIR_ACCESS = re.compile(r"\btt\.(load|store)\b.*:\s*(tensor<([0-9x]+)x!tt\.ptr<(\w+)>>|!tt\.ptr<(\w+)>)")
_TTIR_CONSTANT = re.compile(r"^\s*(%[\w.$-]+)\s*=\s*arith\.constant\s+(-?\d+)\s*:\s*(?:i\d+|index)\b")
_TTIR_FOR = re.compile(r"\bscf\.for\s+%[\w.$-]+\s*=\s*(%[\w.$-]+)\s+to\s+(%[\w.$-]+)\s+step\s+(%[\w.$-]+)")


class UncountedLoop(ValueError):
    """A TTIR loop whose trip count is not a compile-time constant: its accesses cannot be counted."""


def _ttir_accesses(ttir: str) -> list[dict]:
    """The loads and stores one program executes: every TTIR ``tt.load``/``tt.store``, times the trip
    counts of the ``scf.for`` loops around it (constant bounds, e.g. a ``range(CONSTEXPR)``; a loop
    with run-time bounds raises ``UncountedLoop``)."""
    out = []
    constants: dict[str, int] = {}
    depth = 0
    loops: list[tuple[int, int]] = []  # (brace depth inside the loop body, trip count)
    for line in ttir.splitlines():
        code = line.split(" loc(")[0]
        c = _TTIR_CONSTANT.match(code)
        if c:
            constants[c.group(1)] = int(c.group(2))
        f = _TTIR_FOR.search(code)
        if f:
            lower, upper, step = (constants.get(v) for v in f.groups())
            if lower is None or upper is None or step is None or step <= 0:
                raise UncountedLoop(f"loop with a run-time trip count: {code.strip()}")
            trips = max(0, -(-(upper - lower) // step))
        m = _TTIR_ACCESS.search(code)
        if m:
            kind, _, shape, tensor_type, scalar_type = m.groups()
            numel = 1
            if shape:
                for d in shape.split("x"):
                    numel *= int(d)
            elem = tensor_type or scalar_type
            times = 1
            for _, t in loops:
                times *= t
            out.append({"kind": kind, "numel": numel, "bits": _ELEMENT_BITS.get(elem, 32), "type": elem,
                        "tensor": bool(shape), "times": times})
        depth += code.count("{") - code.count("}")
        if f:
            loops.append((depth, trips))
        while loops and depth < loops[-1][0]:
            loops.pop()
    return out


_PTX_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)")


def _ptx_accesses(ptx: str) -> dict:
    """{"ld": {width_bits: count}, "st": {...}} over the static PTX instructions."""
    widths = {"ld": {}, "st": {}}
    for m in _PTX_ACCESS.finditer(ptx):
        parts = m.group(2).split(".")
        vec = 4 if "v4" in parts else 2 if "v2" in parts else 8 if "v8" in parts else 1
        bits = next((int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bufs](8|16|32|64|128)", p)), 32)
        widths[m.group(1)][vec * bits] = widths[m.group(1)].get(vec * bits, 0) + 1
    return widths


def compile_one(config: dict, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    options = dict(config.get("options", {}))
    for key in _OPTION_KEYS:
        if key in config:
            options[key] = config[key]
    options.setdefault("enable_fp_fusion", True)  # Triton 3.9's launch-time default, said explicitly
    signature = config["signature"]
    # Launch-time specialisation: Triton marks a pointer argument tt.divisibility=16 when its address
    # is (every torch allocation), and an integer when its value is a multiple of 16. The report
    # compiles the variant a launcher gets for large tensors: pointers, plus the integers a config
    # lists under "divisible" (sizes that are multiples of 16 in the common case).
    names = config["kernel"].arg_names
    divisible = [a for a, t in signature.items() if t.startswith("*")] + list(config.get("divisible", ()))
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    result = {"name": config["name"], "kernel": f"{config['module']}.{config['kernel'].__name__}", "target": f"sm_{arch}",
              "num_warps": options.get("num_warps", 4)}
    start = time.perf_counter()
    try:
        src = triton.compiler.ASTSource(fn=config["kernel"], signature=signature, constexprs=config["constexprs"], attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as error:  # noqa: BLE001 - the report records any compile failure
        result["error"] = f"{type(error).__name__}: {str(error)[:2000]}"
        return result
    ptx = compiled.asm["ptx"]
    result.update(_ptxas_stats(ptx, arch, options.get("enable_fp_fusion", True)))
    result["shared_bytes"] = int(compiled.metadata.shared)
    result["compile_seconds"] = round(time.perf_counter() - start, 2)

    try:
        accesses = _ttir_accesses(compiled.asm["ttir"])
    except UncountedLoop as error:
        result["error"] = f"{type(error).__name__}: {error}"
        return result
    threads = result["num_warps"] * 32
    largest = max((a["numel"] for a in accesses if a["tensor"]), default=1)
    elements = config.get("elements", largest)
    main = [a for a in accesses if a["tensor"] and a["numel"] * 8 >= largest]
    moved = sum(a["numel"] * a["bits"] / 8 * a["times"] for a in accesses)
    result["bytes_per_program"] = moved
    result["elements_per_program"] = elements
    result["bytes_per_element"] = round(moved / elements, 4)
    widths = _ptx_accesses(ptx)
    result["ptx_global_widths"] = {k: {str(w): c for w, c in sorted(v.items())} for k, v in widths.items()}
    vector = {}
    for kind, ptx_kind in (("load", "ld"), ("store", "st")):
        need = sum(a["numel"] * a["bits"] for a in main if a["kind"] == kind) / threads
        if need == 0:
            continue
        have = sum(w * c for w, c in widths[ptx_kind].items() if w >= 64)
        vector[kind] = {"main_bits_per_thread": need, "vector_bits_per_thread": have, "vectorised": have >= need}
    result["vectorisation"] = vector
    result["vectorised"] = all(v["vectorised"] for v in vector.values())
    for key in ("pair", "min_bytes_per_element"):
        if key in config:
            result[key] = config[key]
    return result


_CONFIGS: list = []


def _compile_index(job):
    index, arch = job
    return compile_one(_CONFIGS[index], arch)


def run(targets=TARGETS, quick=False, workers=None, progress=True, only=None):
    """Compile everything (or the modules named in ``only``); returns (results per target, uncovered
    kernel names, jit functions found)."""
    global _CONFIGS
    configs, defined, uncovered = discover(quick)
    if only:
        configs = [c for c in configs if c["module"].removeprefix("ciuic_kernels.") in only]
    _CONFIGS = configs
    jobs = [(i, arch) for arch in targets for i in range(len(configs))]
    workers = workers or os.cpu_count() or 1
    results = {arch: [None] * len(configs) for arch in targets}
    context = __import__("multiprocessing").get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        for done, ((i, arch), res) in enumerate(zip(jobs, pool.map(_compile_index, jobs, chunksize=1)), 1):
            results[arch][i] = res
            if progress:
                print(f"\r[kernels] {done}/{len(jobs)} compiled", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return results, uncovered, sorted(defined)


def pair_totals(results: list[dict]) -> list[dict]:
    """Encode + decode bytes per element for every pair label, against its one-pass minimum."""
    pairs: dict[str, dict] = {}
    for r in results:
        labels = r.get("pair")
        if labels is None or "error" in r:
            continue
        for label in [labels] if isinstance(labels, str) else labels:
            entry = pairs.setdefault(label, {"pair": label, "bytes_per_element": 0.0, "kernels": []})
            entry["bytes_per_element"] += r["bytes_per_element"]
            entry["kernels"].append(r["name"])
            if "min_bytes_per_element" in r:
                entry["min_bytes_per_element"] = r["min_bytes_per_element"]
    for entry in pairs.values():
        if "min_bytes_per_element" in entry:
            entry["ratio_to_minimum"] = round(entry["bytes_per_element"] / entry["min_bytes_per_element"], 4)
    return sorted(pairs.values(), key=lambda e: e["pair"])


def problems(results: dict, uncovered: list[str]) -> list[str]:
    found = [f"not covered by any AOT_CONFIGS (and not called by a covered kernel): {name}" for name in uncovered]
    for arch, rows in results.items():
        for r in rows:
            where = f"{r['name']} on sm_{arch}"
            if "error" in r:
                found.append(f"{where}: compile error: {r['error'][:500]}")
                continue
            if r["spill_store_bytes"] or r["spill_load_bytes"]:
                found.append(f"{where}: spills {r['spill_store_bytes']} bytes stored / {r['spill_load_bytes']} loaded")
            for kind, v in r["vectorisation"].items():
                if not v["vectorised"]:
                    found.append(f"{where}: main {kind}s not vectorised ({v['vector_bits_per_thread']:.0f} of "
                                 f"{v['main_bits_per_thread']:.0f} bits per thread in 64/128-bit accesses; "
                                 f"PTX widths {r['ptx_global_widths']})")
        for p in pair_totals(rows):
            if p.get("ratio_to_minimum", 1.0) > 1.10:
                found.append(f"{p['pair']} on sm_{arch}: encode+decode move {p['bytes_per_element']:.3f} bytes per element, "
                             f"more than 10% over the one-pass minimum {p['min_bytes_per_element']:.3f}")
    return found


def _summary_rows(rows: list[dict]) -> list[dict]:
    by_kernel: dict[str, list[dict]] = {}
    for r in rows:
        by_kernel.setdefault(r["kernel"], []).append(r)
    out = []
    for kernel, rs in sorted(by_kernel.items()):
        ok = [r for r in rs if "error" not in r]
        out.append({
            "kernel": kernel, "configs": len(rs), "errors": len(rs) - len(ok),
            "registers": (min(r["registers"] for r in ok), max(r["registers"] for r in ok)) if ok else None,
            "spill_bytes": max((r["spill_store_bytes"] + r["spill_load_bytes"] for r in ok), default=0),
            "shared_bytes": max((r["shared_bytes"] for r in ok), default=0),
            "vectorised": f"{sum(r['vectorised'] for r in ok)}/{len(ok)}",
            "bytes_per_element": (min(r["bytes_per_element"] for r in ok), max(r["bytes_per_element"] for r in ok)) if ok else None,
        })  # fmt: skip
    return out


def markdown(reports: dict) -> str:
    lines = ["| kernel | target | configs | registers | spill bytes | shared bytes | main accesses vectorised | bytes/element |",
             "|---|---|---|---|---|---|---|---|"]
    for arch, report in sorted(reports.items()):
        for s in report["summary"]:
            regs = f"{s['registers'][0]}–{s['registers'][1]}" if s["registers"] else "-"
            bpe = f"{s['bytes_per_element'][0]:g}–{s['bytes_per_element'][1]:g}" if s["bytes_per_element"] else "-"
            lines.append(f"| `{s['kernel'].removeprefix('ciuic_kernels.')}` | sm_{arch} | {s['configs']} | {regs} | "
                         f"{s['spill_bytes']} | {s['shared_bytes']} | {s['vectorised']} | {bpe} |")
    report = reports[max(reports)]
    lines += ["", "| codec pair (encode + decode) | bytes/element | one-pass minimum | ratio |", "|---|---|---|---|"]
    for p in report["pairs"]:
        if "min_bytes_per_element" in p and re.search(r"[\[,]bf16[\],]", p["pair"]):
            lines.append(f"| {p['pair']} | {p['bytes_per_element']:.4g} | {p['min_bytes_per_element']:.4g} | {p['ratio_to_minimum']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)), help="compute capabilities, e.g. 80,90")
    parser.add_argument("--quick", action="store_true", help="every constexpr value of every kernel once (CI)")
    parser.add_argument("--out-dir", default=RESULTS, help="where kernels_sm<arch>.json go ('' = do not write)")
    parser.add_argument("--markdown", action="store_true", help="print the BENCHMARKS.md table")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--render", action="store_true", help="print the tables from the saved JSON (no compiling)")
    parser.add_argument("--only", default="", help="comma-separated modules (e.g. optim_state): compile only "
                        "their kernels and replace their rows in the saved JSON")
    args = parser.parse_args(argv)
    if args.render:
        reports = {}
        for arch in (int(t) for t in args.targets.split(",")):
            with open(os.path.join(args.out_dir or RESULTS, f"kernels_sm{arch}.json")) as f:
                reports[arch] = json.load(f)
        print(markdown(reports))
        return 0
    targets = tuple(int(t) for t in args.targets.split(","))
    start = time.perf_counter()
    only = [m for m in args.only.split(",") if m]
    results, uncovered, defined = run(targets, args.quick, args.workers, only=only)
    import triton

    sys.path.insert(0, HERE)
    from _common import git_revision

    reports = {}
    stamp = {"git_revision": git_revision(),
             "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
             "command": "python benchmarks/kernels.py" + (" --quick" if args.quick else "")
             + (f" --only {','.join(only)}" if only else "")}
    for arch, rows in results.items():
        if only:  # the other modules' rows stay as the last full run recorded them
            with open(os.path.join(args.out_dir or RESULTS, f"kernels_sm{arch}.json")) as f:
                saved = json.load(f)
            prefixes = tuple(f"ciuic_kernels.{m}." for m in only)
            rows = [r for r in saved["kernels"] if not r["kernel"].startswith(prefixes)] + rows
            reports[arch] = dict(saved, jit_functions=defined, uncovered=uncovered,
                                 updates=saved.get("updates", []) + [dict(stamp, modules=only)],
                                 summary=_summary_rows(rows), pairs=pair_totals(rows), kernels=rows)
        else:
            reports[arch] = {
                "target": f"cuda sm_{arch}", "triton": triton.__version__, **stamp,
                "jit_functions": defined, "uncovered": uncovered,
                "summary": _summary_rows(rows), "pairs": pair_totals(rows), "kernels": rows,
            }
        if args.out_dir:
            os.makedirs(args.out_dir, exist_ok=True)
            with open(os.path.join(args.out_dir, f"kernels_sm{arch}.json"), "w") as f:
                json.dump(reports[arch], f, indent=1)
    found = problems(results, uncovered)
    total = sum(len(r) for r in results.values())
    print(f"[kernels] {total} compiles ({len(defined)} jit functions) in {time.perf_counter() - start:.0f} s; "
          f"{len(found)} problem(s)")
    if args.markdown:
        print(markdown(reports))
    for p in found:
        print("PROBLEM:", p)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
