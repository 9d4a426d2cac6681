"""Train the demo: a small base model that repeats words, and one LoRA adapter per behaviour.

The base learns its behaviour in full precision; its projections are then rounded through NF4
(bitsandbytes' own quantizer, whose round trip is exact), so the weights written are the values
the server computes with, and the adapters are trained on top of those: QLoRA's recipe. Each
model is checked before it is written: teacher-forced on held-out prompts, where every greedy
token must be right (then greedy decoding gives exactly the expected words).

Knows nothing about caching or serving: it writes an HF model directory and PEFT adapter
directories into the folder it is given, and reports what it measured.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loraserve.model.bitsandbytes_offline import bnb

import torch
from peft import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from loraserve.demo.language import (
    ADAPTERS,
    ANSWER,
    BEHAVIOURS,
    BOS,
    EOS,
    PAD,
    TOKEN_ID,
    VOCABULARY,
    build_tokenizer,
    expected_words,
    sample_words,
)

log = logging.getLogger(__name__)

IGNORED = -100  # a label the loss skips
QUANT_BLOCK = 64  # bitsandbytes' default 4-bit block, as the server quantizes
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the demo's weights; the same recipe writes the same bytes."""

    seed: int = 0
    hidden_size: int = 128
    layers: int = 2
    heads: int = 4
    batch_size: int = 64
    base_steps: int = 700  # per round
    base_rounds: int = 3
    base_learning_rate: float = 3e-3
    adapter_steps: dict[str, int] = field(  # per round
        default_factory=lambda: {"upper": 200, "reverse": 400, "digits": 150}
    )
    # The first round's learning rate; each next round's is half. `reverse` moves attention
    # rather than mapping words: at 1e-2, rank 16 and 250 steps a round it converged on one CPU
    # and stalled under half exact on another (another summation order, another trajectory).
    adapter_learning_rate: float = 3e-3
    adapter_rounds: int = 4  # per attempt
    adapter_attempts: int = 3  # fresh starts, while the check fails
    target_share: float = 1.0  # of the held-out check prompts exact, to stop training an adapter
    rank: int = 32
    alpha: int = 64
    check_prompts: int = 256


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T]: the answer's ids and EOS, IGNORED elsewhere


@dataclass(frozen=True)
class TrainedBehaviour:
    steps: int
    seconds: float
    exact_share: float  # of held-out prompts whose every greedy token is right


def make_batch(rng: random.Random, behaviour: str, size: int, *, held_out: bool) -> Batch:
    """`size` prompts with their expected answers, right-padded."""
    rows: list[tuple[list[int], list[int]]] = []
    for _ in range(size):
        words = sample_words(rng, behaviour, held_out=held_out)
        prompt = [TOKEN_ID[t] for t in (BOS, *words, ANSWER)]
        answer = [TOKEN_ID[t] for t in (*expected_words(behaviour, words), EOS)]
        rows.append((prompt + answer, [IGNORED] * len(prompt) + answer))
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((size, length), TOKEN_ID[PAD])
    attention_mask = torch.zeros((size, length), dtype=torch.long)
    labels = torch.full((size, length), IGNORED)
    for row, (ids, targets) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(ids)] = torch.tensor(targets)
    return Batch(input_ids, attention_mask, labels)


def fit(model: torch.nn.Module, behaviour: str, steps: int, learning_rate: float,
        recipe: Recipe, rng: random.Random) -> None:  # fmt: skip
    """Train the parameters that require grad on `behaviour`'s prompts (one-cycle schedule)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.1
    )
    model.train()
    for _ in range(steps):
        batch = make_batch(rng, behaviour, recipe.batch_size, held_out=False)
        loss = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
        ).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()


@torch.no_grad()
def exact_share(model: torch.nn.Module, behaviour: str, prompts: int, seed: int) -> float:
    """The share of held-out prompts whose answer is right at every token, teacher-forced."""
    batch = make_batch(random.Random(seed), behaviour, prompts, held_out=True)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    predicted = logits[:, :-1].argmax(-1)  # [B, T-1]: the token after each position
    targets = batch.labels[:, 1:]
    wrong = (predicted != targets) & (targets != IGNORED)
    return 1.0 - wrong.any(dim=1).float().mean().item()


@torch.no_grad()
def round_through_nf4(model: PreTrainedModel) -> None:
    """Replace each decoder projection's weight by its NF4 round trip (what the server holds)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in PROJECTIONS:
            packed, state = bnb.functional.quantize_4bit(
                module.weight, blocksize=QUANT_BLOCK, quant_type="nf4"
            )
            module.weight.copy_(
                bnb.functional.dequantize_4bit(
                    packed, state, blocksize=QUANT_BLOCK, quant_type="nf4"
                )
            )


def base_config(recipe: Recipe) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(VOCABULARY),
        hidden_size=recipe.hidden_size,
        intermediate_size=2 * recipe.hidden_size,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=TOKEN_ID[PAD],
        bos_token_id=TOKEN_ID[BOS],
        eos_token_id=TOKEN_ID[EOS],
    )


@dataclass(frozen=True)
class Attempt:
    """A run of training rounds: the best round's check and weights."""

    share: float  # of the check prompts exact, at the best round
    weights: dict[str, torch.Tensor]  # the trained state at that round
    steps: int  # trained, all rounds


def _train_in_rounds(
    model: torch.nn.Module,
    behaviour: str,
    steps: int,
    learning_rate: float,
    rounds: int,
    recipe: Recipe,
    rng: random.Random,
    check_seed: int,
    snapshot: Callable[[], dict[str, torch.Tensor]],
    after_fit: Callable[[], None] = lambda: None,
) -> Attempt:
    """Fit `model` on `behaviour` in rounds of `steps`, each at half the last one's learning
    rate, until the check passes or `rounds` run out; `after_fit` runs before each check, and
    `snapshot` copies what a round trained (a copy: training goes on changing the weights)."""
    best_share, best_weights, trained = -1.0, snapshot(), 0
    for round_ in range(rounds):
        if best_share >= recipe.target_share:
            break
        fit(model, behaviour, steps, learning_rate / 2**round_, recipe, rng)
        trained += steps
        after_fit()
        share = exact_share(model, behaviour, recipe.check_prompts, check_seed)
        if share > best_share:
            best_share, best_weights = share, snapshot()
    return Attempt(best_share, best_weights, trained)


def train_base(directory: Path, recipe: Recipe) -> TrainedBehaviour:
    """Train the base to repeat, round it through NF4, check it and write it to `directory`.

    Like an adapter's, its training goes in rounds (each at half the last one's learning rate,
    from the last round's rounded weights) until the check passes or `recipe.base_rounds` run
    out, and the round that checked best is written."""
    started = time.perf_counter()
    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(base_config(recipe), dtype=torch.float32)
    rng = random.Random(recipe.seed)
    best = _train_in_rounds(
        model, "base", recipe.base_steps, recipe.base_learning_rate, recipe.base_rounds,
        recipe, rng, recipe.seed + 1,
        snapshot=lambda: {name: t.detach().clone() for name, t in model.state_dict().items()},
        after_fit=lambda: round_through_nf4(model),
    )  # fmt: skip
    model.load_state_dict(best.weights)
    model.save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    return TrainedBehaviour(best.steps, time.perf_counter() - started, best.share)


def train_adapter(
    base: Path, behaviour: str, directory: Path, recipe: Recipe, base_location: Path | None = None
) -> TrainedBehaviour:
    """Train one LoRA adapter for `behaviour` on the (NF4-rounded) base; write it as PEFT does,
    its config naming the base at `base_location` (default: `base`, where it is read from).

    An attempt trains in rounds, each at half the last one's learning rate, until the check
    passes (`recipe.target_share`) or its rounds run out; an attempt that runs out is followed
    by another from a fresh initialisation and seed, up to `recipe.adapter_attempts`, and the
    round that checked best of all is kept: a behaviour that moves attention, such as reversing,
    does not converge from every start."""
    started = time.perf_counter()
    check_seed = recipe.seed + 1 + ADAPTERS.index(behaviour)
    best: Attempt | None = None
    steps = 0
    for attempt in range(recipe.adapter_attempts):
        if best is not None and best.share >= recipe.target_share:
            break
        result = _attempt(base, behaviour, recipe, check_seed, check_seed + 1000 * attempt)
        steps += result.steps
        if best is None or result.share > best.share:
            best = result
    if best is None:
        raise ValueError(f"recipe.adapter_attempts is {recipe.adapter_attempts}; it must be >= 1")
    model = _fresh_adapter(base, recipe)
    set_peft_model_state_dict(model, best.weights)
    model.peft_config["default"].base_model_name_or_path = str(base_location or base)
    # No embedding is a target, so nothing asks PEFT to look the base up for its vocabulary
    # (where the base is not written yet, it warned that it found no config there)
    model.save_pretrained(str(directory), save_embedding_layers=False)
    return TrainedBehaviour(steps, time.perf_counter() - started, best.share)


def _attempt(base: Path, behaviour: str, recipe: Recipe, check_seed: int, seed: int) -> Attempt:
    """One attempt of `train_adapter`: a fresh adapter from `seed`, trained round by round."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = _fresh_adapter(base, recipe)
    return _train_in_rounds(
        model, behaviour, recipe.adapter_steps[behaviour], recipe.adapter_learning_rate,
        recipe.adapter_rounds, recipe, rng, check_seed, snapshot=lambda: snapshot_weights(model),
    )  # fmt: skip


def _fresh_adapter(base: Path, recipe: Recipe) -> PeftModel:
    """The base with a newly initialised LoRA adapter of the recipe's shape on every projection."""
    lora = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, target_modules=list(PROJECTIONS))
    return get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora)


def snapshot_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights now (PEFT's state dict shares storage with the live parameters,
    which the next round would go on changing)."""
    return {name: t.detach().clone() for name, t in get_peft_model_state_dict(model).items()}


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread: these matrices are too small to share, and on a busy machine two
    spinning threads can make a step ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_demo(
    directory: Path, recipe: Recipe | None = None, home: Path | None = None
) -> dict[str, TrainedBehaviour]:
    """Write `directory/base`, `directory/adapters/<name>` and `directory/demo.json` (the recipe
    and what each behaviour measured); return the measurements by behaviour. home: where
    `directory` is moved once written (default: it stays), so that each adapter's config names
    the base where it will be."""
    recipe = recipe or Recipe()
    with one_thread():
        trained = _train_all(directory, recipe, (home or directory) / "base")
    report = {"recipe": asdict(recipe), "trained": {k: asdict(v) for k, v in trained.items()}}
    (directory / "demo.json").write_text(json.dumps(report, indent=2) + "\n")
    return trained


def _train_all(directory: Path, recipe: Recipe, base_location: Path) -> dict[str, TrainedBehaviour]:
    trained = {"base": _logged("base", train_base(directory / "base", recipe), recipe.target_share)}
    for behaviour in ADAPTERS:
        adapter_dir = directory / "adapters" / behaviour
        result = train_adapter(directory / "base", behaviour, adapter_dir, recipe, base_location)
        trained[behaviour] = _logged(behaviour, result, recipe.target_share)
    return trained


def _logged(behaviour: str, result: TrainedBehaviour, target_share: float) -> TrainedBehaviour:
    """Logs what `behaviour` measured: a warning when it missed its check (its answers will
    not all be right)."""
    log.log(
        logging.INFO if result.exact_share >= target_share else logging.WARNING,
        "demo %s (%s): %d steps in %.1f s, %.1f%% of held-out prompts exact",
        "base" if behaviour == "base" else f"adapter {behaviour!r}",
        BEHAVIOURS[behaviour].description,
        result.steps,
        result.seconds,
        100 * result.exact_share,
    )
    return result
