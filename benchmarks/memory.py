"""Memory the benchmark reports: the RSS growth of an adapter store that indexes 10,000 stored
adapters, none of them loaded (the bytes the quantized projections hold come from
`loraserve.model.loading.quantized_bytes`).

Knows nothing about throughput.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import save_file

from loraserve.adapters.staging import AdapterPublisher
from loraserve.adapters.store import AdapterStore
from loraserve.model.loading import lora_target_shapes

STORED_ADAPTERS = 10_000


def prepare_store(model_dir: Path, root: Path, count: int = STORED_ADAPTERS) -> Path:
    """A store root holding `count` published adapters for `model_dir` (rank 1 on one projection
    each: the index, not the weights, is what the figure is about); written once."""
    done = root / f".complete-{count}"
    if done.exists():
        return root
    targets = lora_target_shapes(str(model_dir))
    module = next(iter(targets))
    fan_in, fan_out = targets[module]
    weights = root.parent / "tiny-adapter.safetensors"
    save_file(
        {
            f"base_model.model.{module}.lora_A.weight": torch.full((1, fan_in), 0.01),
            f"base_model.model.{module}.lora_B.weight": torch.full((fan_out, 1), 0.01),
        },
        str(weights),
    )
    config = json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": [module]})
    publisher = AdapterPublisher(AdapterStore(root), "bench", targets, max_rank=1)
    for i in range(count):
        tenant = f"tenant-{i % 100}"
        publisher.publish(
            tenant,
            f"adapter-{i}",
            {"adapter_config.json": config.encode(), "adapter_model.safetensors": weights},
        )
    done.touch()
    return root


_RSS_PROBE = textwrap.dedent(
    """
    import gc, json, sys
    from loraserve.adapters.store import AdapterStore

    def rss_kb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    root = sys.argv[2]
    gc.collect()
    before = rss_kb()
    store = AdapterStore(root)
    gc.collect()
    after = rss_kb()
    tenants = {f"tenant-{i % 100}" for i in range(int(sys.argv[3]))}
    indexed = sum(len(store.list_adapters(t, 1000)[0]) for t in tenants)
    print(json.dumps({"growth_kb": after - before, "indexed": indexed}))
    """
)


def registered_rss_mb(model_dir: Path, root: Path) -> dict[str, float]:
    """RSS growth (MB) of a fresh process opening the store at `root`, and what it indexed."""
    result = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(model_dir), str(root), str(STORED_ADAPTERS)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    return {"registered_10k_rss_mb": probe["growth_kb"] / 1024, "indexed": probe["indexed"]}
