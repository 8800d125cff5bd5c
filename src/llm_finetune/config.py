"""The run configuration: small typed sections read from JSON or YAML, and every rule between keys.

Every field carries its help text next to it. Unknown keys and bad values are errors that name the
key, the file and the fix; `--set section.key=value` overrides single keys from the command line.
Rules within a section are the section's `validate`; rules across sections are `RunConfig.validate`;
both run once, when the config is loaded, and the loaded config is never changed afterwards.

The module stays whole (about 500 lines, most of them field help text): the sections, their rules
and the small parser that enforces them are one reading.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from .errors import ConfigError
from .methods import METHODS, OPTIMIZERS, option_readers
from .objectives import option_problems


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    name_or_path: str = _f(
        "default",
        "Base model: 'default' (the built-in SmolLM2-135M-Instruct), a local Hugging Face folder, "
        "a .gguf file, or a Hub id (needs internet).",
    )
    gguf_file: str | None = _f(None, "GGUF file name inside name_or_path, when that is a folder or Hub id.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", "Weights dtype: auto = bf16 on GPUs that support it; on a CPU with AMX or AVX512-BF16 a frozen base "
        "is stored in bf16 and its matrix products run in bf16, with activations, the adapter and its optimizer "
        "state in float32 (learns as float32 does); on other CPUs float32. bfloat16 on a CPU: the all-bf16 forward "
        "under autocast (less memory, learns less like float32). Weights trained in full (method full, "
        "modules_to_save) stay float32 and this dtype is the autocast compute dtype."
    )
    quantization: Literal["none", "8bit", "4bit"] = _f("none", "Load the frozen base quantised (bitsandbytes).")
    trust_remote_code: bool = _f(False, "Allow model code from the Hub repository.")
    allow_pickle: bool = _f(
        False, "Also load weights stored as Python pickles (.bin/.pt/.pth): loading a pickle runs any code it "
        "holds, so only for files from a source you trust. Off: safetensors only (base, adapters, init_adapter).")
    revision: str | None = _f(None, "Hub revision (branch, tag or commit).")


@dataclass
class DataConfig:
    train_file: str | list[str] = _f(
        "data/train.jsonl",
        "Training data: a .jsonl, .json (array), .csv or .parquet file, a folder of them, a Hub dataset id "
        "(needs internet), or a list of these mixed (see train_weights).",
    )
    train_weights: list[float] | None = _f(
        None,
        "One weight per train_file entry: how many times each of its rows is used per epoch (2 = twice, "
        "0.5 = a seeded random half). null = 1 for every file.",
    )
    eval_file: str | None = _f("data/eval.jsonl", "Held-out data; null to train without one.")
    eval_fraction: float | None = _f(
        None, "Hold out this fraction of the training rows (seeded by shuffle_seed) as the eval set; "
        "needs eval_file: null.", min=0.0, max=0.9,
    )
    selection_fraction: float | None = _f(
        None, "Hold out this fraction of the training rows (seeded by shuffle_seed) as a selection set for "
        "train.eval_steps: early stopping and the best checkpoint use its loss, so the eval set the report "
        "scores took no part in choosing the adapter. null = choose on the eval set (the report then marks "
        "its numbers optimistic).", min=0.0, max=0.9,
    )
    format: Literal["auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text"] = _f(
        "auto", "Record format; auto detects it per row (messages, conversations, instruction/output, "
        "prompt/completion, text)."
    )
    template: Literal["chatml", "llama3", "mistral", "gemma", "alpaca"] | None = _f(
        None, "Chat template: null = the tokenizer's own; or a built-in one by name. Missing special tokens are "
        "added and their embedding rows trained.",
    )
    on_error: Literal["stop", "skip"] = _f(
        "stop", "Invalid rows: stop before training and list them, or skip them (written with reasons to "
        "rejected_rows.jsonl in output.logs_dir, and counted).",
    )
    dedup: bool = _f(False, "Drop exact duplicate examples (the first one is kept; the count is recorded).")
    cache: bool = _f(True, "Cache tokenised data under the llm_finetune cache folder (keyed by data, tokenizer, "
                     "template, max_length and options).")
    max_length: int = _f(512, "Longest example in tokens, prompt and answer together.", min=8)
    truncation: Literal["drop", "truncate_left"] = _f(
        "drop",
        "Policy for an example longer than max_length: drop it (counted and reported), or cut prompt "
        "tokens from the left, keeping the answer's end and its end-of-turn token.",
    )
    train_on: Literal["assistant", "last_assistant", "all"] = _f(
        "assistant",
        "Which tokens carry loss: every assistant reply (and its end-of-turn token), only the last "
        "reply, or all tokens. A message with \"train\": false is never trained.",
    )
    system_prompt: str | None = _f(None, "System message added to records that have none.")
    max_train_examples: int | None = _f(None, "Use only the first N training rows (after shuffling).", min=1)
    shuffle_seed: int = _f(42, "Seed of the order of training examples.")
    roles: dict[str, str] = _f(
        {}, "Extra role names for the sharegpt and messages formats, each mapped to system, user or assistant, "
        "e.g. {\"bing\": \"assistant\", \"bard\": \"assistant\"} (matched ignoring case).",
    )

    def validate(self, source: str, given: set[str]) -> None:
        """data.roles: every name a non-empty string, every value one of the three roles a template knows."""
        for name, role in self.roles.items():
            if not isinstance(name, str) or not name.strip():
                raise ConfigError(f"{source}: data.roles: {name!r} is not a role name; give the name as it "
                                  "appears in the data.")
            if role not in ("system", "user", "assistant"):
                raise ConfigError(f"{source}: data.roles.{name}: got {role!r}, expected 'system', 'user' or "
                                  "'assistant' (the roles a chat template renders).")


MethodName = Literal[tuple(METHODS)]  # type: ignore[valid-type]  # the names in methods.METHODS
OptimizerName = Literal[tuple(OPTIMIZERS)]  # type: ignore[valid-type]


# Method keys whose default changed, with the defaults earlier releases wrote into every run_config.json
# (the keys of all methods): r 8 and dropout 0.1 until the defaults sweep, dropout 0.05 until 2026-11-30. An
# IA3, prompt-tuning or full run saved then carries them without having chosen them, so `llm-finetune eval
# --adapter` on it still loads.
EARLIER_DEFAULTS: dict[str, tuple] = {"r": (8,), "dropout": (0.1, 0.05)}


@dataclass
class MethodConfig:
    name: MethodName = _f(
        "lora",
        "Fine-tuning method: lora, qlora (lora on a 4-bit NF4 base), dora, rslora, adalora, ia3, prompt_tuning, "
        "prefix_tuning, p_tuning, or full (every weight trained, no adapter).",
    )
    r: int = _f(16, "LoRA rank (lora, qlora, dora, rslora); 16 by the defaults sweep "
                "(benchmarks/results/defaults_sweep.md).", min=1)
    alpha: float = _f(32.0, "LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) for rslora).", min=0)
    dropout: float = _f(0.0, "Dropout on the LoRA input; 0 by the defaults sweep (the same scores on three tasks "
                        "as 0.05, training 26-32% faster: benchmarks/results/defaults_sweep_dropout.md).",
                        min=0, max=1)
    target_modules: list[str] | str = _f(
        "all-linear", "Module names to adapt, or 'all-linear' (every linear layer but the output head)."
    )
    modules_to_save: list[str] = _f([], "Modules trained in full and saved with the adapter.")
    init_adapter: str | None = _f(None, "Start from this existing adapter folder instead of a fresh one.")
    num_virtual_tokens: int | None = _f(
        None, "Learned virtual tokens (prompt_tuning, prefix_tuning, p_tuning); null = 20.", min=1)
    prompt_init_text: str | None = _f(
        None, "prompt_tuning: initialise the virtual tokens from this text's embeddings (null = random).")
    encoder_hidden_size: int | None = _f(None, "p_tuning: hidden size of the prompt encoder MLP; null = model's.",
                                         min=1)
    adalora_init_r: int | None = _f(None, "adalora: starting rank of every adapted layer; null = 12.", min=1)
    adalora_target_r: int | None = _f(None, "adalora: average rank left after pruning; null = 4.", min=1)
    adalora_tinit_ratio: float | None = _f(
        None, "adalora: fraction of steps trained before any rank is pruned; null = 0.1.", min=0, max=1)
    adalora_tfinal_ratio: float | None = _f(
        None, "adalora: fraction of final steps trained at the final ranks; null = 0.2.", min=0, max=1)
    adalora_orth_reg_weight: float | None = _f(
        None, "adalora: weight of the orthogonality regulariser added to the loss; null = 0.5.", min=0)
    ia3_feedforward_modules: list[str] | None = _f(
        None, "ia3: the target modules scaled on their input (feed-forward); null = the architecture's default.")

    def validate(self, source: str, given: set[str]) -> None:
        """Reject options the chosen method does not read (they would silently do nothing)."""
        fields = dataclasses.fields(self)
        defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                    for f in fields}
        saved = given >= {f.name for f in fields}  # a run_config.json a run wrote: it lists every key
        readers = option_readers()
        for key in sorted(given):
            users = readers.get(key, ())
            # A key left at its default changes nothing (a saved run_config.json lists every key), nor does
            # one a saved run config carries at an earlier release's default.
            value = getattr(self, key)
            if value == defaults.get(key) or (saved and value in EARLIER_DEFAULTS.get(key, ())):
                continue
            if self.name not in users:
                raise ConfigError(
                    f"{source}: method.{key} does not apply to method.name={self.name!r} (it is read by: "
                    f"{', '.join(users)}). Remove it, or choose one of those methods.")
        ff, targets = self.ia3_feedforward_modules, self.target_modules
        if ff and isinstance(targets, list) and not set(ff) <= set(targets):
            raise ConfigError(f"{source}: method.ia3_feedforward_modules {ff} must be a subset of "
                              f"method.target_modules {targets} (IA3 scales the input of those it adapts).")
        if self.adalora_init_r and self.adalora_target_r and self.adalora_target_r > self.adalora_init_r:
            raise ConfigError(f"{source}: method.adalora_target_r ({self.adalora_target_r}) must not exceed "
                              f"method.adalora_init_r ({self.adalora_init_r}): pruning only removes ranks.")


@dataclass
class TrainConfig:
    objective: Literal["sft", "dpo", "orpo", "kto", "simpo"] = _f(
        "sft", "What to train for: sft (supervised, on the answers), or a preference objective on preference data "
        "(dpo, orpo, simpo: prompt + chosen + rejected; kto: answers labelled true/false), through TRL; its options "
        "are the preference section.")
    learning_rate: float | None = _f(None, "Peak learning rate; null = the method's default.", min=0)
    epochs: float = _f(1.0, "Passes over the training data (fractions allowed).", min=0)
    max_steps: int | None = _f(None, "Stop after this many optimizer steps (overrides epochs).", min=1)
    max_tokens: int | None = _f(
        None, "Token budget: train for as many steps as this many tokens take (overrides epochs).", min=1
    )
    batch_size: int = _f(8, "Examples per device per forward pass.", min=1)
    gradient_accumulation_steps: int = _f(1, "Forward passes per optimizer step.", min=1)
    warmup_ratio: float = _f(0.05, "Fraction of steps spent warming the learning rate up.", min=0, max=1)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = _f("cosine", "LR schedule.")
    weight_decay: float = _f(0.0, "AdamW weight decay.", min=0)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.", min=0)
    seed: int = _f(42, "Seed for initialisation, dropout and data order.")
    logging_steps: int = _f(5, "Log loss and throughput every N steps.", min=1)
    save_steps: int | None = _f(None, "Write an intermediate checkpoint every N steps; null = none.", min=1)
    save_total_limit: int = _f(2, "Keep at most this many intermediate checkpoints.", min=1)
    packing: bool | None = _f(
        None, "Padding-free batches: each batch's examples end to end in one row, each attending only to itself "
        "(per-example positions, no padding computed, no attention mask made). Same examples per step and same "
        "loss as padded batches. null = on for every method that can (not prompt_tuning, prefix_tuning, "
        "p_tuning: PEFT ignores per-example positions for them).")
    group_by_length: bool = _f(
        False, "Batch examples of similar length together (seeded groups, longest first), so little of each batch "
        "is padding (matters where packing is off): the order changes what a short run learns (the main job: "
        "eval loss 0.072 vs 0.060 ungrouped), so it is off by default.")
    gradient_checkpointing: bool = _f(False, "Trade compute for activation memory.")
    num_threads: int | None = _f(
        None, "CPU threads for torch; null = the physical cores, divided among the run's processes on this "
        "machine.", min=1)
    optimizer: OptimizerName = _f(
        "adamw",
        "Optimizer: adamw (torch), adamw_8bit (bitsandbytes, 8-bit states; runs on CPU too), paged_adamw_8bit / "
        "paged_adamw_32bit (states paged to CPU memory under GPU pressure; CUDA only), adafactor, sgd.",
    )
    eval_steps: int | None = _f(
        None, "Compute the token-weighted eval loss on the held-out set every N steps (logged to metrics.jsonl "
        "and TensorBoard); null = only after training.", min=1)
    early_stopping_patience: int | None = _f(
        None, "Stop when the eval loss has not improved for this many evaluations (needs train.eval_steps); "
        "null = never stop early.", min=1)
    early_stopping_threshold: float = _f(0.0, "Smallest eval-loss drop that counts as an improvement.", min=0)
    load_best_at_end: bool = _f(
        True, "With train.eval_steps: keep the checkpoint with the lowest eval loss, mark it "
        "(best_checkpoint.json) and save it as the final adapter.")
    spike_guard: float | None = _f(
        None, "Loss-spike guard: a step whose loss exceeds this many times the mean of the previous "
        "train.spike_window steps is never applied: the run rolls back to the newest checkpoint (train.save_steps), "
        "skips that step's batch (its rows named in the log and metrics.jsonl) and continues; before the first "
        "checkpoint the batch is skipped where it is. null = off (e.g. 3.0 to turn it on).", min=1)
    spike_window: int = _f(20, "Steps whose mean loss a step is compared with (train.spike_guard); the guard "
                           "starts once this many steps are behind it.", min=2)
    spike_max_skips: int = _f(3, "More loss spikes than this stop the run (train.spike_guard): the data or the "
                              "learning rate needs looking at.", min=1)


@dataclass
class EvalConfig:
    max_examples: int | None = _f(120, "Evaluate on at most this many eval rows (the first N).", min=1)
    max_new_tokens: int = _f(48, "Generation length cap for the task metric.", min=1)
    batch_size: int = _f(16, "Prompts generated together (left padded).", min=1)
    metric: Literal["exact_match", "json", "normalized_match", "contains", "rougeL", "chrf"] = _f(
        "exact_match", "Headline task metric: exact match of the answer, JSON validity with the reference's keys, "
        "match after normalising case/spaces/punctuation, reference contained in the answer, ROUGE-L or chrF. "
        "All are computed and reported; this one leads the table."
    )
    compare_base: bool = _f(True, "Also evaluate the base model, for the base-vs-tuned table.")
    format: Literal["none", "json", "json_schema", "regex"] = _f(
        "none", "Format accuracy: is each answer valid JSON, valid against eval.schema, or a full match of eval.regex.")
    schema: str | dict | None = _f(
        None, "JSON Schema for eval.format=json_schema: the schema object itself, or a path to a .json file.")
    regex: str | None = _f(None, "Regular expression the whole answer must match, for eval.format=regex.")
    consistency_samples: int = _f(
        0, "Consistency: sample this many answers per prompt and measure their agreement; 0 = off (costs k "
        "generations per prompt).", min=0)
    consistency_temperature: float = _f(0.7, "Sampling temperature for the consistency samples.", min=0)
    regression_file: str | None = _f(
        None, "General prompts unrelated to the task (JSONL): loss and answers base vs tuned show what the "
        "fine-tune cost in general ability; null = skip.")
    top_changed: int = _f(5, "List this many examples that changed most, in each direction.", min=0)
    report: bool = _f(True, "Write report.md, report.json and plots into output.dir after training.")


@dataclass
class OutputConfig:
    dir: str = _f("checkpoints", "Run folder: final adapter, intermediate checkpoints, manifest.")
    logs_dir: str = _f("logs", "Folder of training.log and metrics.jsonl.")
    adapter_name: str = _f("adapter_model", "Name of the final artifact folder inside dir.")
    overwrite: bool = _f(True, "Replace a previous final artifact (written atomically).")
    tensorboard: bool = _f(True, "Write TensorBoard event files under logs_dir/tensorboard.")
    verify_reload: Literal["auto", "always", "never"] = _f(
        "auto", "Before the run reports success, load the saved adapter back from disk and compare its loss on a "
        "fixed batch with the trained model's. auto = where the save was sharded (FSDP, DeepSpeed ZeRO-3), "
        "always = every run (one more load of the base), never. The saved tensors' shapes are checked on "
        "every run.")


@dataclass
class PreferenceConfig:
    """Options of the preference objectives (train.objective); each reads only its own (objectives.py)."""

    beta: float | None = _f(None, "Strength of the preference term; null = the objective's default (0.1; simpo "
                            "2.0).", min=0)
    loss_type: str | None = _f(None, "dpo / kto: TRL's loss variant (dpo: sigmoid, hinge, ipo, robust, ...; kto: "
                               "kto, apo_zero_unpaired); null = sigmoid / kto.")
    label_smoothing: float = _f(0.0, "dpo (robust, exo_pair), simpo: assumed rate of wrongly ordered pairs.",
                                min=0, max=0.5)
    desirable_weight: float = _f(1.0, "kto: weight of the desirable answers' loss.", min=0)
    undesirable_weight: float = _f(1.0, "kto: weight of the undesirable answers' loss.", min=0)
    simpo_gamma: float = _f(0.5, "simpo: target reward margin.", min=0)
    cache_reference: bool = _f(True, "dpo / kto: keep the reference log-probabilities on disk (keyed by data, "
                               "model, init_adapter, template, max_length, precision), so another run skips "
                               "that pass.")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def learning_rate(self) -> float:
        """train.learning_rate, or the method's default (methods.METHODS) when it is null."""
        return self.train.learning_rate or METHODS[self.method.name].learning_rate

    @property
    def packing(self) -> bool:
        """train.packing, or (null) whether the method can train on packed rows (methods.Method.packs); never for
        a preference objective (TRL batches the answers of a pair together)."""
        if self.train.objective != "sft":
            return False
        return self.train.packing if self.train.packing is not None else METHODS[self.method.name].packs

    def resolved(self) -> RunConfig:
        """A copy with every default that depends on other keys filled in (the method's learning rate,
        packing): what a run saves as run_config.json. The config itself is never changed after loading."""
        return dataclasses.replace(self, train=dataclasses.replace(self.train, learning_rate=self.learning_rate,
                                                                    packing=self.packing))

    def validate(self, source: str) -> None:
        """Every rule between keys of different sections, checked once when the config is loaded."""
        d, t, e, m = self.data, self.train, self.eval, self.method

        def fail(message: str):
            raise ConfigError(f"{source}: {message}")

        files = d.train_file if isinstance(d.train_file, list) else [d.train_file]
        if not files:
            fail("data.train_file is an empty list; give at least one file")
        if d.train_weights is not None:
            if len(d.train_weights) != len(files):
                fail(f"data.train_weights has {len(d.train_weights)} entries but data.train_file has {len(files)}; "
                     "give one weight per file")
            if any(w <= 0 for w in d.train_weights):
                fail(f"data.train_weights: every weight must be above 0, got {d.train_weights}")
        if d.eval_fraction and d.eval_file:
            fail(f"data.eval_fraction={d.eval_fraction} and data.eval_file={d.eval_file!r} are both set; choose one: "
                 "set data.eval_file=null to hold out a fraction of the training rows")
        if d.selection_fraction and not t.eval_steps:
            fail(f"data.selection_fraction={d.selection_fraction} holds rows out for train.eval_steps, which is not "
                 "set: set train.eval_steps (e.g. 25) or data.selection_fraction=null")
        if t.eval_steps and not (d.eval_file or d.eval_fraction or d.selection_fraction):
            fail("train.eval_steps needs a held-out set: set data.eval_file (or data.eval_fraction, or "
                 "data.selection_fraction), or train.eval_steps=null")
        if t.early_stopping_patience and not t.eval_steps:
            fail("train.early_stopping_patience needs train.eval_steps (how often to measure eval loss), "
                 "e.g. --set train.eval_steps=25")
        if t.early_stopping_patience and not t.load_best_at_end:
            fail("train.early_stopping_patience needs train.load_best_at_end=true (the Trainer tracks the best "
                 "eval loss through it)")
        if t.eval_steps and t.load_best_at_end and t.save_steps and t.save_steps % t.eval_steps:
            fail(f"train.save_steps ({t.save_steps}) must be a multiple of train.eval_steps ({t.eval_steps}) to keep "
                 "the best checkpoint; or set train.save_steps=null to save only when the eval loss improves")
        if t.packing and not METHODS[m.name].packs:
            fail(f"train.packing=true cannot train method.name={m.name}: PEFT ignores the per-example positions of "
                 "a packed row for virtual-token methods, so examples would attend to each other. Set "
                 "train.packing=false (or null, which packs only where the method can).")
        forced = METHODS[m.name].quantization
        if forced and self.model.quantization not in ("none", forced):
            fail(f"method.name={m.name} means a {forced} base, but model.quantization is "
                 f"'{self.model.quantization}'. Use method.name=lora with model.quantization="
                 f"{self.model.quantization}, or drop model.quantization.")
        if m.name == "full" and self.model.quantization != "none":
            fail(f"method.name=full trains every weight, and quantised ({self.model.quantization}) weights cannot be "
                 "trained. Use model.quantization=none, or an adapter method (qlora, lora, dora, ...) on the "
                 "quantised base.")
        for problem in option_problems(t.objective, dataclasses.asdict(self.preference)):
            fail(problem)
        if t.objective != "sft":
            if METHODS[m.name].family not in ("lora", "ia3", "full"):
                why = ("AdaLoRA adds its orthogonality regulariser to the model's own loss, which TRL's preference "
                       "losses never read" if m.name == "adalora" else "TRL's preference trainers score each answer "
                       "token at its input position, which virtual-token methods shift")
                fail(f"train.objective={t.objective} cannot train method.name={m.name}: {why}. Use lora (or qlora, "
                     "dora, rslora, ia3, full)")
            if t.packing or t.group_by_length:
                fail(f"train.objective={t.objective}: TRL's preference trainers batch chosen and rejected answers "
                     "together, padded; set train.packing and train.group_by_length to false/null")
        if e.format == "json_schema" and not e.schema:
            fail("eval.format is 'json_schema' but eval.schema is not set: give a schema file path or inline JSON")
        if e.format == "regex" and not e.regex:
            fail("eval.format is 'regex' but eval.regex is not set, e.g. --set 'eval.regex=[A-D]'")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "method": MethodConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "output": OutputConfig,
    "preference": PreferenceConfig,
}


# ---------------------------------------------------------------------------------------------
# Validation


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else f" Valid keys: {', '.join(sorted(options))}."


def _type_name(tp) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return "an object"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false",
            dict: "an object"}.get(tp, str(tp))


def _coerce(value: Any, tp, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to floats). Raise ConfigError."""
    origin = get_origin(tp)
    if origin is Literal:
        if value in get_args(tp):
            return value
    elif origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
    elif origin is list:
        if isinstance(value, list):
            (item,) = get_args(tp)
            return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
    raise ConfigError(f"{where}: got {value!r}, expected {_type_name(tp)}.")


def _build_section(cls, raw: Any, section: str, source: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: section '{section}' must be an object of keys, got {type(raw).__name__}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(
                f"{source}: unknown key '{section}.{key}'.{_closest(key, list(fields))}"
            )
        where = f"{source}: {section}.{key}"
        value = _coerce(value, hints[key], where)
        meta = fields[key].metadata
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if "min" in meta and value < meta["min"]:
                raise ConfigError(f"{where}: got {value!r}, must be at least {meta['min']}.")
            if "max" in meta and value > meta["max"]:
                raise ConfigError(f"{where}: got {value!r}, must be at most {meta['max']}.")
        values[key] = value
    section_obj = cls(**values)
    if hasattr(section_obj, "validate"):
        section_obj.validate(source, set(values))
    return section_obj


def from_dict(raw: Any, source: str = "<config>") -> RunConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be an object with sections {', '.join(SECTIONS)}.")
    sections = {}
    for name, value in raw.items():
        if name.startswith("_") or name == "$schema":  # comments such as "_command"
            continue
        if name not in SECTIONS:
            raise ConfigError(f"{source}: unknown section '{name}'.{_closest(name, list(SECTIONS))}")
        sections[name] = _build_section(SECTIONS[name], value, name, source)
    cfg = RunConfig(**sections)
    cfg.validate(source)
    return cfg


def read_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
        return raw if raw is not None else {}
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None


def parse_override(item: str) -> tuple[str, str, Any]:
    """'train.learning_rate=1e-4' -> ('train', 'learning_rate', 1e-4). Values parse as JSON, else text."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set train.learning_rate=1e-4")
    key, text = item.split("=", 1)
    if key.count(".") != 1:
        raise ConfigError(f"--set {item!r}: the key must be section.key, e.g. train.epochs")
    section, name = key.split(".")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    return section, name, value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    raw: dict[str, Any] = read_file(path) if path else {}
    source = str(path) if path else "<defaults>"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be an object with sections {', '.join(SECTIONS)}.")
    raw = json.loads(json.dumps(raw))  # a private copy
    for item in overrides or []:
        section, name, value = parse_override(item)
        if section not in SECTIONS:
            raise ConfigError(f"--set {item!r}: unknown section '{section}'.{_closest(section, list(SECTIONS))}")
        raw.setdefault(section, {})[name] = value
    return from_dict(raw, source if not overrides else f"{source} (with --set)")


def describe() -> str:
    """Every key with its type, default and help: `llm-finetune config --help-keys`."""
    lines = []
    for name, cls in SECTIONS.items():
        lines.append(f"[{name}]")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {name}.{f.name} ({_type_name(hints[f.name])}, default {default!r}): {f.metadata['help']}")
    return "\n".join(lines)
