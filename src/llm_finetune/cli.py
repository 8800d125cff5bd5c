"""The `llm-finetune` command: one table of verbs; heavy imports happen inside the verb that runs.

It stays whole: it is the command's one table of verbs and their arguments, and each verb's body is a few
lines that call the package (split up, the table would be spread over files that each hold a fragment)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from .errors import UserError

DEFAULT_CONFIG = "config/lora_config.json"


def _user_errors() -> tuple[type[BaseException], ...]:
    """What the CLI reports as a one-line message: every UserError (errors.py), and a path that is
    missing or already there."""
    return (UserError, FileNotFoundError, FileExistsError)


def _load_config(args):
    from .config import load_config

    path = args.config
    if path is None and os.path.isfile(DEFAULT_CONFIG):
        path = DEFAULT_CONFIG
    return load_config(path, args.set)


# ---------------------------------------------------------------------------------------------
# Verbs


def cmd_train(args) -> int:
    from .distributed import processes, start_processes
    from .quiet import library_output_to_log

    cfg = _load_config(args)
    if args.dry_run:
        with library_output_to_log(quiet_errors=_user_errors()):  # import-time notices ask nothing of the user
            from .dry_run import estimate, format_plan

            plan = estimate(cfg, args.throughput, world_size=args.nproc)
        print(format_plan(plan))
        return 0
    if (launched := start_processes(args.nproc, args.argv)) is not None:  # --nproc N: under torchrun, its status
        return launched
    # Library notices that ask nothing of the user go to the run's log (the recipe is imported inside the routing).
    with library_output_to_log(quiet_errors=_user_errors()):
        if cfg.train.objective == "sft":
            from .train import run
        else:  # a preference objective: TRL's trainer for it, in the same engine
            from .preference_train import run

        result = run(cfg, resume=args.resume, allow_changed=args.allow_changed, overwrite=args.overwrite)
    if not processes().is_main:  # the main process prints the result once
        return 0
    if result.report and cfg.train.objective != "sft":
        from .evaluation.preference import format_preference_table
        from .evaluation.score import format_table

        print(f"\nBase vs tuned preference on {cfg.data.eval_file or 'the held-out rows'}:")
        print(format_preference_table(result.report))
        print("\nAnswers generated for the held-out prompts (reference: the chosen answer):")
        print(format_table(result.report["generation"]))
    elif result.report:
        from .evaluation.score import format_table

        print(f"\nBase vs tuned on {cfg.data.eval_file} ({result.report['tuned']['n']} examples):")
        print(format_table(result.report))
        if cfg.eval.report:
            print(f"report: {cfg.output.dir}/report.md (report.json, plots/)")
    print(f"\nadapter: {result.adapter_dir}   log: {cfg.output.logs_dir}/training.log   "
          f"wall time: {result.manifest['wall_time_s']:.0f} s")
    return 0


def cmd_generate(args) -> int:
    from .data.tokenize import ChatEncoder
    from .generate import base_for, load_for_inference, stream_one

    sampling = _sampling(args)
    model, tokenizer = load_for_inference(base_for(args.model, args.adapter), args.adapter,
                                          allow_pickle=args.allow_pickle)
    encoder = ChatEncoder(tokenizer, system_prompt=args.system)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise UserError("empty prompt: pass it as an argument or on stdin")
    ids = encoder.encode_prompt([{"role": "user", "content": prompt}])
    gen = stream_one(model, tokenizer, ids, encoder.generation_eos_ids(), **sampling.kwargs())
    if not gen.stopped:
        print(f"[stopped at --max-new-tokens={args.max_new_tokens}]", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from pathlib import Path

    from .config import load_config

    # Without --config, an adapter evaluates with the config it was trained with (its eval file, metric,
    # base model), which run_config.json in the adapter folder records.
    saved = [Path(a) / "run_config.json" for a in args.adapter[-1:]]
    if args.config is None and saved and saved[0].is_file():
        cfg = load_config(saved[0], args.set)
    else:
        cfg = _load_config(args)
    from .evaluation.report import summary_table
    from .evaluation.run import run_eval

    report, paths = run_eval(cfg, args.adapter, args.against, args.eval_file, args.out)
    names = report["order"]
    print(f"\n{' vs '.join(names)} on {args.eval_file or cfg.data.eval_file} ({report[names[-1]]['n']} examples):")
    for n in names:
        print(f"  {n}: {report['labels'][n]}")
    print(summary_table(report))
    print(f"\nreport: {paths['md']}  (and {paths['json'].name}, plots/)")
    return 0


def _sampling(args):
    from .generate import Sampling

    try:
        return Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed).check()
    except ValueError as e:
        raise UserError(str(e)) from None


def cmd_chat(args) -> int:
    from .data.tokenize import ChatEncoder
    from .generate import base_for, chat_loop, load_for_inference

    sampling = _sampling(args)
    model, tokenizer = load_for_inference(base_for(args.model, args.adapter), args.adapter,
                                          allow_pickle=args.allow_pickle)
    encoder = ChatEncoder(tokenizer, system_prompt=args.system)
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat: type a message; /reset forgets the conversation, /exit ends it.")
    chat_loop(model, tokenizer, encoder, sys.stdin, sampling=sampling, interactive=interactive)
    return 0


def cmd_predict(args) -> int:
    from .data.prompts import load_prompts
    from .data.tokenize import ChatEncoder
    from .generate import base_for, load_for_inference, predict_file

    sampling = _sampling(args)
    if os.path.exists(args.out) and not args.overwrite:
        raise FileExistsError(f"{args.out} exists; pass --overwrite or choose another --out")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    prompts = load_prompts(args.input, args.format)  # every row checked before the model is loaded
    model, tokenizer = load_for_inference(base_for(args.model, args.adapter), args.adapter,
                                          allow_pickle=args.allow_pickle)
    encoder = ChatEncoder(tokenizer, system_prompt=args.system)
    n = predict_file(model, tokenizer, encoder, prompts, args.out, args.batch_size, sampling)
    print(f"{n} predictions written to {args.out}")
    return 0


def cmd_push(args) -> int:
    from .hub import plan_push, push

    plan = plan_push(args.artifact, args.repo)
    print(("would upload " if args.dry_run else "uploading ") + plan.listing())
    if args.dry_run:
        print("\n--- model card (README.md) ---\n" + plan.card)
        return 0
    url = push(plan, private=args.private, revision=args.revision)
    print(f"pushed: {url}")
    return 0


def cmd_init(args) -> int:
    from .scaffold import init_project

    written = init_project(args.dir, force=args.force)
    print(f"new project in {args.dir}:")
    for path in written:
        print(f"  {path}")
    print(f"\nnext: cd {args.dir} && python scripts/run_finetune.py --config config/lora_config.json")
    return 0


def cmd_merge(args) -> int:
    from .export.merge import merge

    result = merge(args.adapter, args.out, model=args.model, overwrite=args.overwrite, allow_pickle=args.allow_pickle)
    for check in result.checks or [result.check]:
        print(check.line())
    print(f"tied embeddings: {'kept tied' if result.tied else 'not tied in the base'}")
    print(f"merged model: {result.out_dir}  (base {result.base}; loads with AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_export(args) -> int:
    from .export.gguf import export_gguf

    if args.format != "gguf":
        raise UserError(f"--format {args.format}: only gguf is supported")
    if not args.adapter and not args.model:
        raise UserError("pass --adapter (merged into its base first) or --model (export a base model as it is)")
    result = export_gguf(args.out, adapter=args.adapter, model=args.model, qtype=args.type,
                         verify=not args.no_verify, overwrite=args.overwrite, tokenizer_pre=args.tokenizer_pre,
                         modelfile=not args.no_modelfile, allow_pickle=args.allow_pickle)
    if result.check:
        print(result.check.line())
    else:
        print("not verified (--no-verify)")
    if result.fallback_f16:
        print(f"kept in F16 (rows not a multiple of 32): {', '.join(result.fallback_f16)}")
    print(f"GGUF ({result.qtype}, {result.tensors} tensors): {result.path}  ({result.path.stat().st_size / 1e6:.1f} MB)")
    if result.modelfile:
        print(f"Ollama: {result.modelfile}   (ollama create NAME -f {result.modelfile})")
    return 0


def cmd_config(args) -> int:
    import json

    from .config import describe

    if args.keys:
        print(describe())
        return 0
    print(json.dumps(_load_config(args).to_dict(), indent=2))
    return 0


def _data_encoder(args):
    """The tokenizer, template and encoding options a training run with this config would use."""
    cfg = _load_config(args)
    from .data.tokenize import encoder_for
    from .models import load_tokenizer, resolve_source

    source = resolve_source(cfg.model.name_or_path, cfg.model.gguf_file, cfg.model.revision)
    _, encoder = encoder_for(cfg.data, load_tokenizer(source, cfg.model.trust_remote_code))
    return cfg, encoder


def _data_source(args, cfg) -> str:
    if args.file:
        return args.file
    if isinstance(cfg.data.train_file, list):
        raise UserError("data.train_file is a list; name the file to check, e.g. llm-finetune data check FILE")
    return cfg.data.train_file


def cmd_data_check(args) -> int:
    import json
    from pathlib import Path

    from .data.doctor import check

    cfg, encoder = _data_encoder(args)
    spec = _data_source(args, cfg)
    if cfg.train.objective != "sft":  # preference rows (pairs, or KTO's labelled answers)
        from .data.preference import check_preferences

        ok, text = check_preferences(spec, cfg.train.objective, encoder, cfg.data.roles)
        print(text)
        return 0 if ok else 1
    plot = args.plot or str(Path(cfg.output.logs_dir) / f"data_check_{Path(spec).stem or 'data'}.png")
    report = check(spec, encoder, cfg.data.format, histogram=None if args.no_plot else plot, roles=cfg.data.roles)
    print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) if args.json else report.format())
    return 0 if report.ok else 1


def cmd_data_preview(args) -> int:
    from .data.doctor import preview

    cfg, encoder = _data_encoder(args)
    if cfg.train.objective != "sft":
        from .data.preference import preview_preferences

        return 0 if preview_preferences(_data_source(args, cfg), cfg.train.objective, encoder, args.n,
                                        cfg.data.roles) else 1
    color = {"auto": None, "always": True, "never": False}[args.color]
    shown = preview(_data_source(args, cfg), encoder, args.n, cfg.data.format, color, roles=cfg.data.roles)
    return 0 if shown else 1


def cmd_data(args) -> int:
    if not getattr(args, "data_func", None):
        args.data_parser.print_help()
        return 2
    return args.data_func(args)


# ---------------------------------------------------------------------------------------------
# The table


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help=f"run config (JSON or YAML); default {DEFAULT_CONFIG} if present")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key, e.g. --set train.learning_rate=1e-4 (repeatable)")


def _train_args(p):
    _config_args(p)
    p.add_argument("--dry-run", action="store_true",
                   help="print parameters, memory, tokens and ETA from config.json alone; load no weights, train nothing")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue an interrupted run from the newest complete checkpoint in output.dir "
                        "(or from CHECKPOINT); logs and metrics are appended")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an output.dir that holds an unfinished run (its checkpoints are removed)")
    p.add_argument("--allow-changed", action="store_true",
                   help="with --resume: continue although the config or the data changed (each change is logged)")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="train with N processes on this machine (one per GPU, or on CPUs) through torchrun; with "
                        "--dry-run: the plan and memory per process")
    p.add_argument("--throughput", type=float, metavar="TOKENS_PER_S",
                   help="training throughput for the dry run's ETA (default: from a previous run in output.dir)")


def _generate_args(p):
    p.add_argument("prompt", nargs="?", help="the user message (read from stdin when omitted)")
    _inference_args(p)


def _inference_args(p, max_new_tokens: int = 256):
    p.add_argument("--model", help="base model (default: the adapter's base from its run_manifest.json, "
                                    "else the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", help="adapter folder to apply (e.g. checkpoints/adapter_model)")
    p.add_argument("--system", help="system message")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=None, help="makes sampled output repeatable")
    _allow_pickle_arg(p)


def _allow_pickle_arg(p):
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load weights stored as Python pickles (.bin/.pt): loading one runs any code it holds, "
                        "so only for files you trust (default: safetensors only)")


def _chat_args(p):
    _inference_args(p)


def _predict_args(p):
    p.add_argument("input", help="JSONL of prompts: alpaca rows (output optional), chat rows (messages ending "
                                 "with a user turn, or with an answer used as reference), or {\"prompt\": ...}")
    p.add_argument("--out", required=True, help="JSONL to write, one prediction per input row, same order")
    p.add_argument("--format", default="auto", choices=["auto", "alpaca", "messages"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _inference_args(p, max_new_tokens=128)


def _push_args(p):
    p.add_argument("artifact", help="adapter folder, merged model folder, or .gguf file")
    p.add_argument("--repo", required=True, help="Hub repository, owner/name (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--revision", help="branch to commit to")
    p.add_argument("--dry-run", action="store_true", help="list exactly what would be uploaded, upload nothing")


def _init_args(p):
    p.add_argument("dir", help="folder for the new project (created; must be empty or absent)")
    p.add_argument("--force", action="store_true", help="write into a folder that already has files")


def _merge_args(p):
    p.add_argument("adapter", help="adapter folder (e.g. checkpoints/adapter_model)")
    p.add_argument("--out", required=True, help="folder to write the merged model to")
    p.add_argument("--model", help="base model (default: the one recorded in the adapter's run_manifest.json)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _allow_pickle_arg(p)


def _export_args(p):
    p.add_argument("--format", default="gguf", choices=["gguf"])
    p.add_argument("--adapter", help="adapter folder: merged into its base, then exported")
    p.add_argument("--model", help="base model to export as it is, or the adapter's base when both are given")
    p.add_argument("--out", required=True, help="the .gguf file to write (a Modelfile is written next to it)")
    p.add_argument("--type", default="f16", choices=["f16", "q8_0"], help="weight type (norms stay F32)")
    p.add_argument("--tokenizer-pre", help="llama.cpp pre-tokenizer name when it cannot be inferred")
    p.add_argument("--no-verify", action="store_true", help="skip loading the file back and comparing logits")
    p.add_argument("--no-modelfile", action="store_true", help="do not write an Ollama Modelfile")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _allow_pickle_arg(p)


def _eval_args(p):
    _config_args(p)
    p.add_argument("--adapter", action="append", default=[], metavar="DIR",
                   help="adapter folder to evaluate (default: output.dir/adapter_name of the config); give it "
                        "twice to compare two runs (the first is the baseline)")
    p.add_argument("--against", metavar="DIR|base",
                   help="baseline for the comparison: 'base' (the default) or another adapter folder")
    p.add_argument("--eval-file", help="held-out JSONL (default: data.eval_file of the config)")
    p.add_argument("--out", help="folder for report.md, report.json and plots/ (default: the adapter's run folder)")


def _config_cmd_args(p):
    _config_args(p)
    p.add_argument("--keys", action="store_true", help="list every key with its type, default and help")


def _data_args(p):
    sub = p.add_subparsers(dest="data_command", metavar="CHECK|PREVIEW")
    c = sub.add_parser("check", help="validate a data file and report formats, token lengths, truncation, "
                                     "duplicates; exit 1 if rows are invalid")
    c.add_argument("file", nargs="?", help="data file, folder or dataset (default: the config's data.train_file)")
    _config_args(c)
    c.add_argument("--plot", help="where to save the length histogram PNG (default: <logs_dir>/data_check_<name>.png)")
    c.add_argument("--no-plot", action="store_true", help="do not draw the histogram")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.set_defaults(data_func=cmd_data_check)
    v = sub.add_parser("preview", help="print examples exactly as the model sees them, trained tokens marked")
    v.add_argument("file", nargs="?", help="data file, folder or dataset (default: the config's data.train_file)")
    _config_args(v)
    v.add_argument("-n", type=int, default=3, help="how many examples (default 3)")
    v.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                   help="colour trained tokens (auto: when printing to a terminal; else [[...]] markers)")
    v.set_defaults(data_func=cmd_data_preview)
    p.set_defaults(data_parser=p)


COMMANDS: dict[str, tuple[Callable, Callable, str]] = {
    "train": (cmd_train, _train_args, "fine-tune a model as the config says"),
    "generate": (cmd_generate, _generate_args, "answer one prompt, streamed (base model or with an adapter)"),
    "eval": (cmd_eval, _eval_args, "evaluate base vs tuned (or two runs) on a held-out set and write the report"),
    "config": (cmd_config, _config_cmd_args, "print the resolved config, or every key with --keys"),
    "data": (cmd_data, _data_args, "the data doctor: `data check FILE` and `data preview FILE -n 3`"),
    "merge": (cmd_merge, _merge_args, "fold an adapter into its base: a full model folder, checked"),
    "export": (cmd_export, _export_args, "write a GGUF file (f16/q8_0) + Ollama Modelfile, checked"),
    "chat": (cmd_chat, _chat_args, "multi-turn chat (/reset, /exit); also reads a piped script of turns"),
    "predict": (cmd_predict, _predict_args, "answer every prompt of a JSONL file in batches, to JSONL"),
    "push": (cmd_push, _push_args, "upload an adapter, merged model or GGUF to the Hub, with a model card"),
    "init": (cmd_init, _init_args, "scaffold a new fine-tuning project that trains as it is"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-finetune", description="Fine-tune causal language models with PEFT.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (func, add_args, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except _user_errors() as e:
        from .distributed import processes

        who = processes().label  # several processes: which one failed
        print(f"llm-finetune {args.command}: error{f' ({who})' if who else ''}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llm-finetune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
