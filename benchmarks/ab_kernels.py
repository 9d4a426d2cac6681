"""The CPU kernels of a git revision against the working tree's, paired in one process.

Compiles both trees' `model/kernels` for this CPU under two op namespaces (`ab_base`,
`ab_tree`), builds the default benchmark model once (hidden 1024, 8 layers, NF4, fp32
compute), prefills 32 prompts, and alternates the decode steps between the two builds, so that
both see the same machine at the same moments: on a shared, noisy machine, runs minutes apart
differ by more than a kernel change. Then profiles a few decode steps of each (per-op times).

    .venv/bin/python benchmarks/ab_kernels.py --base 6b7fbde --repeats 2
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import transformers
from torch.profiler import ProfilerActivity, profile

import loraserve.model.attention
import loraserve.model.linear
import loraserve.model.lora
import loraserve.model.sampling
from bench_multi_lora import DEFAULT
from engine_runs import Trace, submit
from loraserve.model.kernels import build
from profile_step import base_workload, warm_base_engine

REPO = Path(__file__).resolve().parent.parent
KERNELS = Path("server/loraserve/model/kernels")  # from the repository's root
CALLERS = (loraserve.model.linear, loraserve.model.attention, loraserve.model.lora)
# Callers of ops that older revisions lack: swapped only when the build has the op, else they
# keep the installed build's in both arms.
LATER_CALLERS = {loraserve.model.sampling: "score_stats"}


def compile_as(namespace: str, sources: dict[str, str], folder: Path) -> object:
    """Compile these kernel sources (file name -> text) with their ops registered under
    `namespace`; returns `torch.ops.<namespace>`."""
    folder.mkdir(parents=True)
    for name, text in sources.items():
        if name == "cpu_kernels.cpp":
            text = text.replace("TORCH_LIBRARY(loraserve,", f"TORCH_LIBRARY({namespace},")
            text = text.replace("TORCH_LIBRARY_IMPL(loraserve,", f"TORCH_LIBRARY_IMPL({namespace},")
        (folder / name).write_text(text)
    variant = build.host_variant()
    if variant is None:
        raise SystemExit("this CPU has no AVX2: no kernels to compare")
    library = folder / f"{namespace}.so"
    build.compile_library(variant, folder / "cpu_kernels.cpp", library)
    torch.ops.load_library(str(library))
    return getattr(torch.ops, namespace)


def sources_at(revision: str | None) -> dict[str, str]:
    """The kernel sources (C++ files and headers) at a git revision, or in the working tree
    (None)."""
    if revision is None:
        return {name: (REPO / KERNELS / name).read_text() for name in build.SOURCES}
    listing = git("ls-tree", "--name-only", f"{revision}:{KERNELS}").split()
    names = [name for name in listing if name.endswith((".cpp", ".h"))]
    return {name: git("show", f"{revision}:{KERNELS / name}") for name in names}


def git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout


def use(ops: object) -> None:
    """Every caller of `native()` gets `ops` from now on (those of `LATER_CALLERS` whose op
    `ops` has)."""
    callers = [*CALLERS, *(m for m, op in LATER_CALLERS.items() if hasattr(ops, op))]
    for module in callers:
        module.native = lambda ops=ops: ops  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="git revision whose kernels to compare")
    parser.add_argument("--repeats", type=int, default=2, help="prefills, then decode steps")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(2)
    logging.basicConfig(level=logging.WARNING)
    transformers.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        builds = {
            "base": compile_as("ab_base", sources_at(args.base), Path(tmp, "base")),
            "tree": compile_as("ab_tree", sources_at(None), Path(tmp, "tree")),
        }
    workload = base_workload(args.new_tokens)
    use(builds["base"])
    core = warm_base_engine(workload)

    steps: dict[str, list[float]] = {name: [] for name in builds}
    for repeat in range(args.repeats):
        submit(core, Trace(), workload, with_adapters=False)
        core.step()  # the prefill, on whichever build came last
        turn = repeat
        while core.has_work():
            name = list(builds)[turn % 2]
            use(builds[name])
            started = time.perf_counter()
            core.step()
            steps[name].append(time.perf_counter() - started)
            turn += 1
    for name, times in steps.items():
        print(f"{name}: decode step median {statistics.median(times) * 1e3:.1f} ms, "
              f"min {min(times) * 1e3:.1f} ms, {len(times)} steps")  # fmt: skip
    ratio = statistics.median(steps["tree"]) / statistics.median(steps["base"])
    print(f"tree / base, median decode step: {ratio:.3f}")

    profiled = min(12, args.new_tokens)  # the engine is sized for --new-tokens
    for name, ops in builds.items():
        use(ops)
        submit(core, Trace(), workload.head(DEFAULT.num_requests, profiled), with_adapters=False)
        core.step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            while core.has_work():
                core.step()
        print(f"\n{name}, {profiled - 1} decode steps:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=4))


if __name__ == "__main__":
    main()
