"""loraserve's engine beside llama.cpp on this CPU: the same random Llama-shaped base, the same
batch shapes, generated (and prompt) tokens per second, the two taking turns in each round.

llama.cpp is measured on its own terms: its own `llama-batched-bench` over GGUF files of the
benchmark's base model (written here from the model's safetensors: the same weights; q and k
rows reordered for llama.cpp's rotary layout), quantized by its own `llama-quantize` to Q4_0
(the output projection left in the checkpoint's F32 or BF16, as loraserve keeps it; the
closest to NF4's 4.5 bits a weight) and to Q4_K_M (llama.cpp's usual choice: a Q6_K output
projection), its default settings
otherwise (f16 KV cache, flash attention as it decides), on the same number of threads. Each
batch is `--sequences` prompts of `--prompt-tokens` random tokens generating `--new-tokens`:
prompt speed is the prompts' tokens over the prefill's time, generation speed the batch's
tokens over the decode steps' time (llama.cpp's S_PP and S_TG; the engine samples greedily and
emits each token as it serves one, llama-batched-bench decodes without sampling).

Then both serve the benchmark's LoRA adapters (rank 16 on all seven projections; for llama.cpp
converted by its own `convert_lora_to_gguf.py`): `--sequences`' largest count of requests,
submitted together, on the base, all on one adapter, and each on its own adapter, by llama.cpp's
`llama-server` (Q4_0, one slot per request, every adapter loaded at start, each request naming
its own, greedy) over loopback HTTP and by the engine in this process; each figure is the
requests' generated tokens over the wall time from the first submission to the last token.

llama.cpp's tools are built for this CPU by `benchmarks/build_llama_cpp.sh` (from the source
llama-cpp-python 0.3.36 vendors on PyPI, with its converter); `gguf` writes the model's files
(the `llama-cpp` extra).

    bash benchmarks/build_llama_cpp.sh
    .venv/bin/pip install -e '.[llama-cpp]'
    .venv/bin/python benchmarks/bench_llama_cpp.py --out benchmarks/results/llama_cpp.json
    .venv/bin/python benchmarks/bench_llama_cpp.py --compute-dtype bf16
    .venv/bin/python benchmarks/bench_llama_cpp.py --model tinyllama-1.1b --checkpoint-dtype bf16

`--model tinyllama-1.1b` runs it all on a base of TinyLlama 1.1B's shape instead of the
benchmark's default model; `--quantize-output 4bit` (or `int8`) holds the engine's output
projection in 4 (8) bits (`quantize_output`), as Q4_K_M holds llama.cpp's in 6.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import loraserve.model.bitsandbytes_offline  # noqa: F401  (before peft, which imports it)

import gguf
import numpy as np
import torch
import transformers
from safetensors.torch import load_file

from bench_metrics_scrape import free_ports
from bench_multi_lora import (
    BASES,
    DEFAULT,
    TARGETS,
    BenchConfig,
    base_engine_config,
    make_workload,
)
from common import DEFAULT_CACHE_DIR, Workload, prepare_lora_adapters, prepare_model
from engine_runs import Trace, build_engine, engine_config, run_engine, submit
from loraserve.engine.core import EngineCore
from machine import machine_info
from profile_step import timed_steps

LLAMA_CPP_VERSION = "0.3.36"  # llama-cpp-python's release whose vendored llama.cpp is built
LLAMA_CPP_DIR = Path.home() / ".cache" / "loraserve" / "llama.cpp" / LLAMA_CPP_VERSION
SERVED_QUANTIZATION = "Q4_0"
SERVER_START_S = 300
# GGUF variants: name -> llama-quantize's options, then its type (which follows the files)
QUANTIZED = {
    "Q4_0": ["--leave-output-tensor", "Q4_0"],
    "Q4_K_M": ["Q4_K_M"],
}
# transformers' Llama names -> GGUF's, per layer and for the rest
LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
MODEL_TENSORS = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}


def rotary_pairs_adjacent(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """[heads * d, in] rows of q or k, each head's rotated pairs (i, i + d/2) as transformers'
    Llama pairs them -> the same rows with pairs (2i, 2i + 1), as llama.cpp's Llama rotates."""
    rows, columns = weight.shape
    halves = weight.reshape(heads, 2, rows // heads // 2, columns)  # [head, half, i, in]
    return halves.transpose(1, 2).reshape(rows, columns)


def write_gguf(model_dir: Path, path: Path) -> None:
    """The Llama checkpoint in `model_dir` (one safetensors file) as a GGUF file holding its
    matrices in the checkpoint's dtype (F32 or BF16) and its norms in F32."""
    config = json.loads((model_dir / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}
    tensors = load_file(str(model_dir / "model.safetensors"))
    bf16 = tensors["lm_head.weight"].dtype == torch.bfloat16
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16 if bf16 else gguf.LlamaFileType.ALL_F32)
    # A vocabulary of placeholder pieces (llama-server detokenizes what it generates); token ids
    # are what every run feeds, so the pieces never matter.
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([f"t{i}" for i in range(config["vocab_size"])])
    special = {config["pad_token_id"], config["bos_token_id"], config["eos_token_id"]}
    writer.add_token_types(
        [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
         for i in range(config["vocab_size"])]
    )  # fmt: skip
    writer.add_token_merges(["t 1"])  # one merge: a BPE vocabulary needs some
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_add_bos_token(False)

    def add(name: str, tensor: torch.Tensor) -> None:
        if tensor.dim() == 1 or tensor.dtype != torch.bfloat16:
            writer.add_tensor(name, tensor.float().numpy())
        else:  # numpy has no bf16: its bits, named as such
            bits = tensor.contiguous().view(torch.int16).numpy().view(np.uint16)
            writer.add_tensor(name, bits, raw_dtype=gguf.GGMLQuantizationType.BF16)

    for name, gguf_name in MODEL_TENSORS.items():
        add(f"{gguf_name}.weight", tensors[f"{name}.weight"])
    for layer in range(config["num_hidden_layers"]):
        for name, gguf_name in LAYER_TENSORS.items():
            weight = tensors[f"model.layers.{layer}.{name}.weight"]
            if name == "self_attn.q_proj":
                weight = rotary_pairs_adjacent(weight, heads)
            elif name == "self_attn.k_proj":
                weight = rotary_pairs_adjacent(weight, kv_heads)
            add(f"blk.{layer}.{gguf_name}.weight", weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def prepare_gguf(model_dir: Path, bin_dir: Path) -> dict[str, Path]:
    """The model's quantized GGUF files (QUANTIZED), written beside it once and reused."""
    folder = model_dir.parent / "gguf"
    folder.mkdir(exist_ok=True)
    source = folder / "model-unquantized.gguf"
    if not source.exists():
        partial = source.with_suffix(".partial")
        write_gguf(model_dir, partial)
        partial.replace(source)
    files = {}
    for name, arguments in QUANTIZED.items():
        out = folder / f"model-{name.lower()}.gguf"
        if not out.exists():
            partial = out.with_suffix(".partial")
            options, kind = arguments[:-1], arguments[-1]
            command = [str(bin_dir / "llama-quantize"), *options, str(source), str(partial), kind]
            subprocess.run(command, check=True, capture_output=True)
            partial.replace(out)
        files[name] = out
    return files


@dataclass(frozen=True)
class Shape:
    """A batch: `sequences` prompts of `prompt_tokens` each, generating `new_tokens` each."""

    sequences: int
    prompt_tokens: int
    new_tokens: int


@dataclass(frozen=True)
class Speeds:
    """Tokens per second of one run: the prompts' (prefill) and the generated ones (decode)."""

    prompt: float
    generation: float


def run_batched_bench(bin_dir: Path, model: Path, shapes: list[Shape], threads: int
                      ) -> dict[int, Speeds]:  # fmt: skip
    """llama-batched-bench over `model` for every shape (one prompt length and new tokens, the
    shapes' numbers of sequences): their speeds by number of sequences."""
    prompt, new = shapes[0].prompt_tokens, shapes[0].new_tokens
    most = max(s.sequences for s in shapes)
    command = [
        str(bin_dir / "llama-batched-bench"), "-m", str(model), "-t", str(threads),
        "-tb", str(threads), "-c", str(most * (prompt + new)), "-b", "2048", "-ub", "512",
        "-npp", str(prompt), "-ntg", str(new),
        "-npl", ",".join(str(s.sequences) for s in shapes), "--output-format", "jsonl",
    ]  # fmt: skip
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    rows = [
        json.loads(line)
        for line in (done.stdout + done.stderr).splitlines()
        if line.startswith('{"n_kv_max"')
    ]
    if len(rows) != len(shapes):
        raise RuntimeError(f"llama-batched-bench printed {len(rows)} results, not {len(shapes)}")
    return {row["pl"]: Speeds(row["speed_pp"], row["speed_tg"]) for row in rows}


def engine_speeds(core: EngineCore, bench: BenchConfig, shape: Shape) -> Speeds:
    """The engine on `shape` (prompts drawn as `bench` draws them): every prompt prefilled in its
    first step, then decode steps of every sequence, each timed."""
    config = replace(bench, num_requests=shape.sequences,
                     prompt_tokens=(shape.prompt_tokens, shape.prompt_tokens))  # fmt: skip
    workload = make_workload(config, [""] * shape.sequences).head(shape.sequences, shape.new_tokens)
    trace = Trace()
    submit(core, trace, workload, with_adapters=False)
    steps = timed_steps(core, trace)
    if trace.errors:
        raise trace.errors[0]
    if trace.tokens != shape.sequences * shape.new_tokens or len(steps) != shape.new_tokens:
        raise RuntimeError("the engine did not prefill every prompt in its first step")
    decoded = shape.sequences * (shape.new_tokens - 1)  # the prefill step emits each first token
    return Speeds(shape.sequences * shape.prompt_tokens / steps[0], decoded / sum(steps[1:]))


def convert_adapters(adapter_dirs: dict[str, Path], model_dir: Path, converter: Path
                     ) -> list[Path]:  # fmt: skip
    """Each PEFT adapter as a GGUF LoRA (F32) by llama.cpp's own converter, written beside the
    adapters once and reused; in `adapter_dirs`' order."""
    files = []
    for name, directory in adapter_dirs.items():
        out = directory.parent / "gguf" / f"{name}.gguf"
        if not out.exists():
            out.parent.mkdir(exist_ok=True)
            partial = out.with_suffix(".partial")
            command = [sys.executable, str(converter), "--base", str(model_dir), "--outtype",
                       "f32", "--outfile", str(partial), str(directory)]  # fmt: skip
            subprocess.run(command, check=True, capture_output=True)
            partial.replace(out)
        files.append(out)
    return files


@contextmanager
def llama_server(bin_dir: Path, model: Path, loras: list[Path], slots: int, context: int,
                 threads: int) -> Iterator[str]:  # fmt: skip
    """llama-server on loopback with `slots` slots of `context` tokens and every LoRA loaded
    (applied to none until a request names it); yields its URL once it reports healthy."""
    (port,) = free_ports(1)
    command = [
        str(bin_dir / "llama-server"), "-m", str(model), "-t", str(threads), "-tb", str(threads),
        "-c", str(slots * context), "-np", str(slots), "--host", "127.0.0.1", "--port", str(port),
        "--lora-init-without-apply", *(a for lora in loras for a in ("--lora", str(lora))),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {process.returncode}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass  # not listening yet, or still loading (503)
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama-server not healthy after {SERVER_START_S} s")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


def served_tok_s(url: str, workload: Workload, lora_ids: list[int | None], loaded: int) -> float:
    """llama-server: every request of `workload` at once (request i on LoRA lora_ids[i], or
    none), greedy, eos ignored; generated tokens over the wall time. Each request names every
    one of the `loaded` LoRAs with its scale: llama-server applies each it is not told about at
    the scale it was loaded with (1), a request naming none included."""

    def complete(request: tuple[tuple[int, ...], int | None]) -> int:
        prompt, lora = request
        body = {
            "prompt": list(prompt), "n_predict": workload.new_tokens, "ignore_eos": True,
            "temperature": 0.0, "cache_prompt": False,
            "lora": [{"id": i, "scale": 1.0 if i == lora else 0.0} for i in range(loaded)],
        }  # fmt: skip
        sent = urllib.request.Request(
            f"{url}/completion", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(sent, timeout=600) as response:
            return int(json.load(response)["tokens_predicted"])

    with ThreadPoolExecutor(len(workload.prompts)) as pool:
        started = time.perf_counter()
        counts = list(pool.map(complete, zip(workload.prompts, lora_ids)))
        seconds = time.perf_counter() - started
    if any(c != workload.new_tokens for c in counts):
        raise RuntimeError(f"llama-server generated {counts} tokens, not {workload.new_tokens}")
    return sum(counts) / seconds


def engine_tok_s(core: EngineCore, workload: Workload, with_adapters: bool) -> float:
    """The engine: every request of `workload` at once; generated tokens over the steps' time."""
    trace = run_engine(core, workload, with_adapters)
    return trace.tokens / sum(trace.step_seconds)


# Served cases: name -> each request's adapter (its index among the adapters), or None
def served_cases(requests: int) -> dict[str, list[int | None]]:
    return {
        "base": [None] * requests,
        "one_adapter": [0] * requests,
        "distinct_adapters": list(range(requests)),
    }


def median_speeds(runs: list[Speeds]) -> dict[str, float]:
    return {
        "prompt_tok_s": statistics.median(r.prompt for r in runs),
        "generation_tok_s": statistics.median(r.generation for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", choices=sorted(BASES), default="default", help="the random base's shape"
    )
    parser.add_argument("--sequences", type=int, nargs="+", default=[1, DEFAULT.num_requests])
    parser.add_argument("--prompt-tokens", type=int, default=96, help="the default's mean")
    parser.add_argument("--new-tokens", type=int, default=DEFAULT.new_tokens)
    parser.add_argument("--compute-dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument(
        "--checkpoint-dtype",
        choices=("fp32", "bf16"),
        default=DEFAULT.model.weights_dtype,
        help="how the random model's checkpoint stores its weights (published ones: bf16)",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3, help="rounds, each runs everything")
    parser.add_argument(
        "--llama-cpp", type=Path, default=LLAMA_CPP_DIR, help="build_llama_cpp.sh's folder"
    )
    parser.add_argument(
        "--quantize-output",
        choices=("off", "4bit", "int8"),
        default="off",
        help="the engine's output projection quantized too (as Q4_K_M's is in 6 bits)",
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    bin_dir, converter = (
        args.llama_cpp / "bin",
        args.llama_cpp / "convert" / "convert_lora_to_gguf.py",
    )
    shapes = [Shape(n, args.prompt_tokens, args.new_tokens) for n in sorted(args.sequences)]
    most = shapes[-1].sequences

    spec = replace(BASES[args.model], weights_dtype=args.checkpoint_dtype)
    model_dir = prepare_model(spec, DEFAULT_CACHE_DIR)
    files = prepare_gguf(model_dir, bin_dir)
    adapter_dirs = prepare_lora_adapters(model_dir, most, DEFAULT.rank, DEFAULT.alpha, TARGETS)
    adapter_files = convert_adapters(adapter_dirs, model_dir, converter)
    bench = replace(DEFAULT, model=spec, compute_dtype=args.compute_dtype, num_requests=most,
                    prompt_tokens=(args.prompt_tokens, args.prompt_tokens))  # fmt: skip
    workload = make_workload(bench, list(adapter_dirs)).head(most, args.new_tokens)
    settings = engine_config(base_engine_config(bench, model_dir), workload, args.prompt_tokens)
    settings = settings.model_copy(update={"quantize_output": args.quantize_output})
    core = build_engine(settings, adapter_dirs)
    run_engine(core, workload.head(4, 2), with_adapters=True)  # warm-up
    cases = served_cases(most)
    names = list(adapter_dirs)

    batched: dict[str, dict[int, list[Speeds]]] = {
        name: {s.sequences: [] for s in shapes} for name in ["loraserve", *files]
    }
    served: dict[str, dict[str, list[float]]] = {
        name: {case: [] for case in cases}
        for name in ["loraserve", f"llama.cpp {SERVED_QUANTIZATION}"]
    }
    context = args.prompt_tokens + args.new_tokens
    with llama_server(bin_dir, files[SERVED_QUANTIZATION], adapter_files, most, context,
                      args.threads) as url:  # fmt: skip
        for ids in cases.values():  # warm-up: each case's first batch allocates and repacks
            served_tok_s(url, workload.head(most, 2), ids, len(adapter_files))
        for round_ in range(args.repeats):
            order = ["loraserve", *files] if round_ % 2 == 0 else [*files, "loraserve"]
            for name in order:
                if name == "loraserve":
                    for shape in shapes:
                        batched[name][shape.sequences].append(engine_speeds(core, bench, shape))
                    for case, ids in cases.items():
                        on = replace(workload, adapters=tuple(names[i or 0] for i in ids))
                        served[name][case].append(engine_tok_s(core, on, ids[0] is not None))
                else:
                    for n, speeds in run_batched_bench(bin_dir, files[name], shapes,
                                                       args.threads).items():  # fmt: skip
                        batched[name][n].append(speeds)
                    if name == SERVED_QUANTIZATION:
                        for case, ids in cases.items():
                            served[f"llama.cpp {name}"][case].append(
                                served_tok_s(url, workload, ids, len(adapter_files))
                            )
            print(f"round {round_ + 1} of {args.repeats} done", flush=True)

    medians = {
        name: {n: median_speeds(r) for n, r in by_n.items()} for name, by_n in batched.items()
    }
    served_medians = {
        name: {case: statistics.median(r) for case, r in by_case.items()}
        for name, by_case in served.items()
    }
    print(f"\n{args.model} model, {args.prompt_tokens}-token prompts, {args.new_tokens} new "
          f"tokens, {args.threads} threads; {args.checkpoint_dtype} checkpoint, loraserve NF4 in "
          f"{args.compute_dtype}; median tok/s")  # fmt: skip
    print(
        f"{'':<18}"
        + "".join(f"{f'{n} seq prompt':>16}{f'{n} seq gen':>14}" for n in batched["loraserve"])
    )
    for name, by_n in medians.items():
        cells = "".join(
            f"{m['prompt_tok_s']:>16.1f}{m['generation_tok_s']:>14.1f}" for m in by_n.values()
        )
        print(f"{name:<18}{cells}")
    print(f"\n{most} requests served together, generated tok/s end to end")
    print(f"{'':<18}" + "".join(f"{case:>20}" for case in cases))
    for name, by_case in served_medians.items():
        print(f"{name:<18}" + "".join(f"{v:>20.1f}" for v in by_case.values()))
    if args.out:
        report = {
            "machine": machine_info(),
            "command": {k: str(v) for k, v in vars(args).items()},
            "llama_cpp": f"llama-cpp-python {LLAMA_CPP_VERSION}'s vendored llama.cpp",
            "batched_medians": {
                name: {str(n): m for n, m in by_n.items()} for name, by_n in medians.items()
            },
            "served_medians": served_medians,
            "batched_runs": {
                name: {str(n): [vars(r) for r in rs] for n, rs in by_n.items()}
                for name, by_n in batched.items()
            },
            "served_runs": served,
        }
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
