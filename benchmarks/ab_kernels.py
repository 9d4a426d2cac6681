"""The CPU kernels of a git revision against the working tree's, paired in one process.

Compiles both trees' `model/kernels` for this CPU under two op namespaces (`ab_base`,
`ab_tree`), builds the default benchmark model once (hidden 1024, 8 layers, NF4, fp32
compute), prefills 32 prompts of 64-128 tokens (`--rows`: another number of them), and
alternates the decode steps between the two builds, so that both see the same machine at the
same moments: on a shared, noisy machine, runs minutes apart differ by more than a kernel
change. Then profiles a few decode steps of each (per-op times). Its decode steps run eagerly
(`traced_decode_records` 0): a record replays the ops it was made with, whichever build is
swapped in after (RESULTS.md, 2026-12-05: from 9d7e2e4 to d494f11 both builds' steps replayed
the first one's records).

    .venv/bin/python benchmarks/ab_kernels.py --base 6b7fbde --repeats 2

`--compute-dtype`, `--checkpoint-dtype`, `--kv-heads` and `--prompt-tokens` change that model
and workload (a bf16 checkpoint's output projection is held in bf16 under fp32 compute): fewer kv
heads than its 16 q heads give it grouped-query attention, and longer prompts give decode
attention more context to read (the prefill then takes as many steps as the step budget needs).

    .venv/bin/python benchmarks/ab_kernels.py --base 2c96085 --compute-dtype bf16 --kv-heads 4 \
        --prompt-tokens 960 1024 --new-tokens 24

With `--projections` it times the kernels alone instead, on the default model's shapes: one
round is every 4-bit projection of a decode step (8 layers x 7, 32 rows or `--rows`, random
NF4 bytes, each layer its own weights) and then the fp32 output projection, the two builds
alternating round by round, with 64 MB read between rounds so that the weights come from
memory as in a model; with `--llama3-8b`, one Llama 3 8B layer's seven 4-bit projections
instead. Steps of the engine vary by more than a few percent; these rounds do not.

    .venv/bin/python benchmarks/ab_kernels.py --base 6b7fbde --projections --threads 2
    .venv/bin/python benchmarks/ab_kernels.py --base 6b7fbde --projections --rows 1
    .venv/bin/python benchmarks/ab_kernels.py --base 6b7fbde --projections --rows 1 --llama3-8b

With `--lora-prefill` it times the LoRA kernel alone the same way, on a prefill of the default
workload (32 prompts of 64-128 tokens, each on its own rank-16 adapter, every projection).

    .venv/bin/python benchmarks/ab_kernels.py --base 6b7fbde --lora-prefill --rounds 16

With `--lora-decode`, on a decode step of it instead (32 tokens, each on its own adapter).

    .venv/bin/python benchmarks/ab_kernels.py --base 6b7fbde --lora-decode --rounds 30

With `--attention`, decode attention alone over pools in scattered blocks: the default model's
step (32 rows of 96-160 positions, 16 heads of 64, 8 layers), 32 rows of 1,024 positions and
one row of 4,000 in the shape of Llama 3 8B's layer (32 query heads over 8 kv heads of 128),
and 32 rows of 1,024 in the shapes of Qwen2.5 3B's (16 query heads over 2 kv heads of 128)
and 7B's (28 over 4).

    .venv/bin/python benchmarks/ab_kernels.py --base 6b7fbde --attention --rounds 16

`--compute-dtype bf16` gives the projection rounds bf16 rows (each 4-bit projection a call of
the bf16 kernel, in AMX tiles where the CPU has them, and a bf16 output projection), the LoRA
rounds bf16 rows and slots (bf16 compute's deltas), and the attention rounds bf16 queries and
pools.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import loraserve.model.bitsandbytes_offline  # bitsandbytes without the Hub, before what imports it

import torch
import transformers
from torch.profiler import ProfilerActivity, profile

import loraserve.model.attention
import loraserve.model.kv_cache
import loraserve.model.linear
import loraserve.model.lora
import loraserve.model.norms
import loraserve.model.sampling
from bench_multi_lora import DEFAULT, make_workload
from common import Workload
from engine_runs import Trace, submit
from loraserve.engine.core import EngineCore
from loraserve.model import huge_pages
from loraserve.model.host_memory import keep_freed_memory
from loraserve.model.kernels import build
from loraserve.model.loading import DTYPES
from profile_step import warm_base_engine

REPO = Path(__file__).resolve().parent.parent
KERNELS = Path("server/loraserve/model/kernels")  # from the repository's root
CALLERS = (loraserve.model.linear, loraserve.model.attention, loraserve.model.lora)
# Callers of ops that older revisions lack: swapped only when the build has the op, else they
# keep the installed build's in both arms.
LATER_CALLERS = {loraserve.model.sampling: "score_stats"}
# Callers whose module falls back to torch's ops without theirs: an older build without the op
# runs them the torch way, as that revision did (through the wrapper, which costs a call).
FALLBACK_CALLERS = {loraserve.model.norms: "rms_norm", loraserve.model.kv_cache: "kv_write_"}


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
    `ops` has; those of `FALLBACK_CALLERS` whose op it lacks get None: the torch path)."""
    callers = [*CALLERS, *(m for m, op in LATER_CALLERS.items() if hasattr(ops, op))]
    for module in callers:
        module.native = lambda ops=ops: ops  # type: ignore[attr-defined]
    for module, op in FALLBACK_CALLERS.items():
        chosen = ops if hasattr(ops, op) else None
        module.native = lambda chosen=chosen: chosen  # type: ignore[attr-defined]


def compare_projections(
    builds: dict[str, object],
    rounds: int,
    rows: int,
    llama3_8b: bool = False,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Rounds of a decode step's projections for `rows` rows (see the module's docstring), or
    with `llama3_8b` of one Llama 3 8B layer's seven, alternating builds; prints each build's
    median round and the ratio, per kernel. In bf16 (`dtype`), the rows and the output
    projection's weight are bf16 and each 4-bit projection is a call of the bf16 kernel."""
    keep_freed_memory()  # as a CPU engine's process does: no fresh pages per call
    spec = DEFAULT.model
    generator = torch.Generator().manual_seed(0)
    shapes = LLAMA3_8B_LAYER if llama3_8b else projection_shapes() * spec.num_layers
    layers = [
        (
            torch.randn(rows, k, generator=generator).to(dtype),
            torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, generator=generator),
            torch.rand(n * k // 64, generator=generator),
            n,
        )
        for k, n in shapes
    ]
    code = torch.linspace(-1.0, 1.0, 16)  # any 16 values: the kernels' work does not depend on them
    head = torch.randn(spec.vocab_size, spec.hidden_size, generator=generator).to(dtype)
    head_rows = torch.randn(rows, spec.hidden_size, generator=generator).to(dtype)
    absent = torch.empty(0)
    bf16 = dtype == torch.bfloat16
    projection = "linear_4bit_bf16" if bf16 else "linear_4bit"
    output_projection = "linear_bf16" if bf16 else "linear_f32"

    def one_round(ops: Any) -> dict[str, float]:
        started = time.perf_counter()
        for x, packed, absmax, n in layers:
            if bf16:
                ops.linear_4bit_bf16(
                    x, [packed], [absmax], [code], [64], [n], [absent], [absent], [absent], [0.0]
                )
            else:
                ops.linear_4bit(x, packed, absmax, code, 64, n, None)
        ended = time.perf_counter()
        if llama3_8b:
            return {f"{projection} x 7 (Llama 3 8B layer)": ended - started}
        getattr(ops, output_projection)(head_rows, head, None)
        return {f"{projection} x 56": ended - started,
                f"{output_projection} (lm_head)": time.perf_counter() - ended}  # fmt: skip

    alternate(builds, rounds, one_round)


def compare_lora(builds: dict[str, object], rounds: int, decode: bool, dtype: torch.dtype) -> None:
    """Rounds of a step's LoRA deltas on the default workload's shapes (a prefill of 32 prompts
    of 64-128 tokens, or a decode step of one token each, each on its own rank-16 slot; the seven
    projections of every layer, each layer its own slots; rows and slots in `dtype`), alternating
    builds; prints each build's median round and the ratio."""
    keep_freed_memory()
    spec, rank, slots = DEFAULT.model, DEFAULT.rank, DEFAULT.num_requests + 1
    generator = torch.Generator().manual_seed(0)
    low, high = (1, 1) if decode else DEFAULT.prompt_tokens
    lengths = torch.randint(low, high + 1, (DEFAULT.num_requests,), generator=generator)
    ends = torch.cumsum(lengths, 0)
    segments = (ends - lengths, ends, torch.arange(1, slots), torch.full_like(lengths, rank))
    tokens = int(ends[-1])
    layers = [
        (
            torch.randn(tokens, k, generator=generator).to(dtype),
            torch.zeros(tokens, n, dtype=dtype),
            (torch.randn(slots, rank, k, generator=generator) * 0.01).to(dtype),
            (torch.randn(slots, rank, n, generator=generator) * 0.01).to(dtype),
        )
        for _ in range(spec.num_layers)
        for k, n in projection_shapes()
    ]

    def one_round(ops: Any) -> dict[str, float]:
        started = time.perf_counter()
        for x, y, lora_a, lora_b in layers:
            ops.lora_delta_(x, y, lora_a, lora_b, *segments)
        return {f"lora_delta_ x 56 ({tokens} tokens)": time.perf_counter() - started}

    alternate(builds, rounds, one_round)


def compare_attention(builds: dict[str, object], rounds: int, dtype: torch.dtype) -> None:
    """Rounds of decode attention on the shapes of the module's docstring, queries and pools in
    `dtype`, each row's blocks of 16 positions scattered over its pools (on huge pages, as the
    engine's), alternating builds; prints each build's median round and the ratio, per shape."""
    generator = torch.Generator().manual_seed(0)
    block_size = 16

    def case(lengths: list[int], heads: int, kv_heads: int, head_dim: int) -> tuple:
        blocks = [-(-n // block_size) for n in lengths]
        order = torch.randperm(sum(blocks), generator=generator).to(torch.int32)
        tables = torch.zeros(len(lengths), max(blocks), dtype=torch.int32)
        for row, first in enumerate(torch.tensor([0, *blocks]).cumsum(0)[:-1].tolist()):
            tables[row, : blocks[row]] = order[first : first + blocks[row]]
        pool = (sum(blocks) * block_size, kv_heads, head_dim)
        k, v = (huge_pages.zeros(pool, dtype) for _ in range(2))  # as the engine's pools
        for half in (k, v):
            half.copy_(torch.randn(pool, generator=generator))
        q = torch.randn(len(lengths), heads, head_dim, generator=generator).to(dtype)
        return q, k, v, tables, torch.tensor(lengths, dtype=torch.int32), head_dim**-0.5

    prompts = torch.randint(64, 129, (DEFAULT.num_requests,), generator=generator) + 32
    spec = DEFAULT.model
    default_model = [
        case(
            prompts.tolist(), spec.num_heads, spec.num_kv_heads, spec.hidden_size // spec.num_heads
        )
        for _ in range(spec.num_layers)
    ]
    one_row = [
        case(
            prompts[:1].tolist(),
            spec.num_heads,
            spec.num_kv_heads,
            spec.hidden_size // spec.num_heads,
        )
        for _ in range(spec.num_layers)
    ]
    shapes = {
        f"default model, 32 rows x {spec.num_layers} layers": default_model,
        f"default model, 1 row x {spec.num_layers} layers": one_row,
        "32 x 8 heads of 128, 1 row of 200": [case([200], 32, 8, 128)],
        "32 x 8 heads of 128, 32 rows of 1,024": [case([1024] * 32, 32, 8, 128)],
        "32 x 8 heads of 128, 1 row of 4,000": [case([4000], 32, 8, 128)],
        "16 x 2 heads of 128, 32 rows of 1,024": [case([1024] * 32, 16, 2, 128)],
        "28 x 4 heads of 128, 32 rows of 1,024": [case([1024] * 32, 28, 4, 128)],
    }

    def one_round(ops: Any) -> dict[str, float]:
        times = {}
        for name, layers in shapes.items():
            started = time.perf_counter()
            for q, k, v, tables, lens, scale in layers:
                ops.paged_decode_attention(q, k, v, tables, lens, block_size, 0, scale)
            times[name] = time.perf_counter() - started
        return times

    alternate(builds, rounds, one_round)


def prefill(core: EngineCore, workload: Workload) -> None:
    """Submit `workload` and step until every request has its first token."""
    trace = Trace()
    submit(core, trace, workload, with_adapters=False)
    while not all(trace.token_times.values()):
        core.step()


# (K, N) of a Llama 3 8B layer's seven projections: q, k, v, o, gate, up, down.
LLAMA3_8B_LAYER = [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096), (4096, 14336),
                   (4096, 14336), (14336, 4096)]  # fmt: skip


def projection_shapes() -> list[tuple[int, int]]:
    """(K, N) of one layer's seven projections in the default model."""
    hidden, inner = DEFAULT.model.hidden_size, DEFAULT.model.intermediate_size
    return [(hidden, hidden)] * 4 + [(hidden, inner)] * 2 + [(inner, hidden)]


def alternate(
    builds: dict[str, object], rounds: int, one_round: Callable[[Any], dict[str, float]]
) -> None:
    """`one_round(ops)` (kernel name -> seconds) for each build in turn, the order reversed
    every round, with 64 MB read before each, so that the weights come from memory as in a
    model; prints each kernel's median round (the first two are warm-up) and the ratio."""
    flush = torch.randn(16 << 20)  # 64 MB
    times: dict[tuple[str, str], list[float]] = {}
    for turn in range(rounds):
        for name in list(builds) if turn % 2 else list(builds)[::-1]:
            flush.sum()
            for kernel, seconds in one_round(builds[name]).items():
                times.setdefault((name, kernel), []).append(seconds)
    for kernel in dict.fromkeys(kernel for _, kernel in times):
        base, tree = (statistics.median(times[name, kernel][2:]) * 1e3 for name in builds)
        print(f"{kernel}: base {base:.2f} ms, tree {tree:.2f} ms, tree / base {tree / base:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="git revision whose kernels to compare")
    parser.add_argument("--repeats", type=int, default=2, help="prefills, then decode steps")
    parser.add_argument("--new-tokens", type=int, default=64)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--projections", action="store_true", help="the GEMM kernels alone")
    mode.add_argument(
        "--lora-prefill", action="store_true", help="the LoRA kernel alone, on a prefill"
    )
    mode.add_argument(
        "--lora-decode", action="store_true", help="the LoRA kernel alone, on a decode step"
    )
    mode.add_argument("--attention", action="store_true", help="decode attention alone")
    parser.add_argument(
        "--rounds", type=int, default=30, help="with --projections, --lora-*, --attention"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--compute-dtype", choices=sorted(DTYPES), default="fp32",
        help="the engine's; with --projections: the rows' (bf16: the bf16 kernel); with --lora-*: "
        "the rows' and the slots'; with --attention: q's and the pools'",
    )  # fmt: skip
    parser.add_argument(
        "--kv-heads", type=int, default=DEFAULT.model.num_kv_heads,
        help="decode steps: the model's kv heads (fewer than its q heads: grouped-query)",
    )  # fmt: skip
    parser.add_argument(
        "--prompt-tokens", type=int, nargs=2, default=DEFAULT.prompt_tokens,
        metavar=("LOW", "HIGH"), help="decode steps: the prompts' lengths",
    )  # fmt: skip
    parser.add_argument(
        "--rows", type=int, default=DEFAULT.num_requests, help="decode rows (--projections: of x)"
    )
    parser.add_argument(
        "--checkpoint-dtype", choices=("fp32", "bf16"), default=DEFAULT.model.weights_dtype,
        help="decode steps: how the model's checkpoint stores its weights (bf16: under fp32 "
        "compute its unquantized weights are held in bf16)",
    )  # fmt: skip
    parser.add_argument(
        "--llama3-8b", action="store_true",
        help="with --projections: one Llama 3 8B layer's seven instead of the default model's",
    )  # fmt: skip
    args = parser.parse_args()
    if args.llama3_8b and not args.projections:
        parser.error("--llama3-8b goes with --projections")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    transformers.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        builds = {
            "base": compile_as("ab_base", sources_at(args.base), Path(tmp, "base")),
            "tree": compile_as("ab_tree", sources_at(None), Path(tmp, "tree")),
        }
    if args.projections:
        compare_projections(
            builds, args.rounds, args.rows, args.llama3_8b, DTYPES[args.compute_dtype]
        )
        return
    if args.attention:
        compare_attention(builds, args.rounds, DTYPES[args.compute_dtype])
        return
    if args.lora_prefill or args.lora_decode:
        compare_lora(builds, args.rounds, args.lora_decode, DTYPES[args.compute_dtype])
        return
    bench = replace(
        DEFAULT,
        num_requests=max(DEFAULT.num_requests, args.rows),
        compute_dtype=args.compute_dtype,
        prompt_tokens=tuple(args.prompt_tokens),
        model=replace(
            DEFAULT.model, num_kv_heads=args.kv_heads, weights_dtype=args.checkpoint_dtype
        ),
    )
    workload = make_workload(bench, [""] * bench.num_requests).head(args.rows, args.new_tokens)
    use(builds["base"])
    core = warm_base_engine(workload, bench.model, bench, traced_decode_records=0)

    steps: dict[str, list[float]] = {name: [] for name in builds}
    for repeat in range(args.repeats):
        prefill(core, workload)  # on whichever build came last
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
        prefill(core, workload.head(args.rows, profiled))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            while core.has_work():
                core.step()
        print(f"\n{name}, {profiled - 1} decode steps:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=4))


if __name__ == "__main__":
    main()
