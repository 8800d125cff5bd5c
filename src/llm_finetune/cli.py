"""The `llm-finetune` command: one table of verbs; heavy imports happen inside the verb that runs."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

DEFAULT_CONFIG = "config/lora_config.json"


class UserError(Exception):
    """Errors whose message is the whole story for the user: printed without a traceback, exit 2."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from .config import ConfigError
    from .data.records import DataError
    from .data.tokenize import TemplateError
    from .methods import MethodError
    from .models import ModelSourceError

    from .eval_run import EvalSetupError

    return (UserError, ConfigError, DataError, TemplateError, MethodError, ModelSourceError, FileNotFoundError,
            FileExistsError, EvalSetupError)


def _load_config(args):
    from .config import load_config

    path = args.config
    if path is None and os.path.isfile(DEFAULT_CONFIG):
        path = DEFAULT_CONFIG
    return load_config(path, args.set)


# ---------------------------------------------------------------------------------------------
# Verbs


def cmd_train(args) -> int:
    cfg = _load_config(args)
    if getattr(args, "dry_run", False):
        from .plan import estimate, format_plan

        print(format_plan(estimate(cfg, args.throughput)))
        return 0
    from .train import run

    result = run(cfg)
    if result.report:
        from .evaluate import format_table

        print(f"\nBase vs tuned on {cfg.data.eval_file} ({result.report['tuned']['n']} examples):")
        print(format_table(result.report))
        if cfg.eval.report:
            print(f"report: {cfg.output.dir}/report.md (report.json, plots/)")
    print(f"\nadapter: {result.adapter_dir}   log: {cfg.output.logs_dir}/training.log   "
          f"wall time: {result.manifest['wall_time_s']:.0f} s")
    return 0


def cmd_generate(args) -> int:
    from .data.tokenize import ChatEncoder
    from .generate import load_for_inference, stream_one

    model, tokenizer = load_for_inference(args.model, args.adapter)
    encoder = ChatEncoder(tokenizer, system_prompt=args.system)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    ids = encoder.encode_prompt([{"role": "user", "content": prompt}])
    gen = stream_one(model, tokenizer, ids, encoder.generation_eos_ids(), max_new_tokens=args.max_new_tokens,
                     do_sample=args.temperature > 0, temperature=args.temperature or 1.0, top_p=args.top_p,
                     seed=args.seed)
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
    from .eval_run import run_eval
    from .report import summary_table

    report, paths = run_eval(cfg, args.adapter, args.against, args.eval_file, args.out)
    names = report["order"]
    print(f"\n{' vs '.join(names)} on {cfg.data.eval_file} ({report[names[-1]]['n']} examples):")
    for n in names:
        print(f"  {n}: {report['labels'][n]}")
    print(summary_table(report))
    print(f"\nreport: {paths['md']}  (and {paths['json'].name}, plots/)")
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
    from .data.templates import apply_template
    from .data.tokenize import ChatEncoder
    from .models import load_tokenizer, resolve_source

    source = resolve_source(cfg.model.name_or_path, cfg.model.gguf_file, cfg.model.revision)
    tokenizer = load_tokenizer(source, cfg.model.trust_remote_code)
    apply_template(tokenizer, cfg.data.template)
    d = cfg.data
    return cfg, ChatEncoder(tokenizer, d.max_length, d.truncation, d.train_on, d.system_prompt)


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
    plot = args.plot or str(Path(cfg.output.logs_dir) / f"data_check_{Path(spec).stem or 'data'}.png")
    report = check(spec, encoder, cfg.data.format, histogram=None if args.no_plot else plot)
    print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) if args.json else report.format())
    return 0 if report.ok else 1


def cmd_data_preview(args) -> int:
    from .data.doctor import preview

    cfg, encoder = _data_encoder(args)
    color = {"auto": None, "always": True, "never": False}[args.color]
    shown = preview(_data_source(args, cfg), encoder, args.n, cfg.data.format, color)
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
    p.add_argument("--throughput", type=float, metavar="TOKENS_PER_S",
                   help="training throughput for the dry run's ETA (default: from a previous run in output.dir)")


def _generate_args(p):
    p.add_argument("prompt", nargs="?", help="the user message (read from stdin when omitted)")
    p.add_argument("--model", default="default", help="base model (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", help="adapter folder to apply (e.g. checkpoints/adapter_model)")
    p.add_argument("--system", help="system message")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


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
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except _user_errors() as e:
        print(f"llm-finetune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llm-finetune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
