"""Prompt probe: does the untuned model do a task better with a few fixed examples in its prompt?

For each task, the untuned model (greedy, in the faster forward dtype here) generates for a valid.tsv prefix under the task's
template and under few-shot templates whose examples are the first k training pairs (fixed, never
valid or test). Only valid.tsv is scored: this chooses a prompt, it reports nothing on test.
Run: `python -m benchmarks.prompts [--tasks kjv_web web_es] [--valid-pairs 40] [--shots 2 4]`;
writes benchmarks/results/prompts.md and prompts.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from pema.data import Pair, read_pairs, shared_data_dir
from pema.evaluation import score, translate
from pema.prompts import TASK_TEMPLATES, PromptFormat
from tenant.backend import local_backend

DATA = shared_data_dir()
RESULTS = Path(__file__).resolve().parent / "results"


def few_shot_template(task: str, examples: list[Pair]) -> str:
    """The task's instruction line, then `Input:`/`Output:` example pairs, then the source."""
    instruction = TASK_TEMPLATES[task].split("\n", 1)[0]

    def escape(text: str) -> str:  # examples are literal text inside a str.format template
        return text.replace("{", "{{").replace("}", "}}")

    shots = "".join(f"Input: {escape(p.source)}\nOutput: {escape(p.target)}\n\n" for p in examples)
    return f"{instruction}\n\n{shots}Input: {{source}}\nOutput:"


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.prompts", description=__doc__)
    p.add_argument("--tasks", nargs="+", default=["kjv_web", "web_es"], choices=TASK_TEMPLATES)
    p.add_argument("--valid-pairs", type=int, default=40)
    p.add_argument("--shots", nargs="+", type=int, default=[2, 4])
    args = p.parse_args()
    torch.set_num_threads(2)
    backend = local_backend()
    rows = []
    for task in args.tasks:
        valid = read_pairs(DATA / task / "valid.tsv", args.valid_pairs)
        train = read_pairs(DATA / task / "train.tsv", max(args.shots))
        templates = {"task template": TASK_TEMPLATES[task]}
        templates |= {f"{k}-shot": few_shot_template(task, train[:k]) for k in args.shots}
        for name, template in templates.items():
            fmt = PromptFormat(backend.tokenizer, template)
            start = time.perf_counter()
            hyps = translate(backend.backbone, fmt, [x.source for x in valid], batch_size=16)
            row = {
                "task": task,
                "prompt": name,
                **score(hyps, [x.target for x in valid]),
                "prompt_tokens": len(fmt.prompt_ids(valid[0].source)),
                "seconds": round(time.perf_counter() - start, 1),
                "samples": hyps[:2],
            }
            print(json.dumps(row, ensure_ascii=False), file=sys.stderr, flush=True)
            rows.append(row)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prompts.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
    lines = [
        "# Prompt probe (untuned model, valid.tsv only)",
        "",
        f"First {args.valid_pairs} valid.tsv pairs; few-shot examples are the first training pairs. "
        f"Produced by `python -m benchmarks.prompts --valid-pairs {args.valid_pairs}`.",
        "",
        "| task | prompt | prompt tokens (1st pair) | valid BLEU | valid chrF | seconds |",
        "|---|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['task']} | {r['prompt']} | {r['prompt_tokens']} | {r['bleu']} | {r['chrf']} "
        f"| {r['seconds']} |"
        for r in rows
    ]
    (RESULTS / "prompts.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
