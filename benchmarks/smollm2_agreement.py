"""SmolLM2-135M-Instruct on the first N GSM8K test problems: mpd's evaluation against a plain
transformers script, side by side.

The plain side is written here without mpd's code: the model directory loaded with
transformers, each question in the tokenizer's chat template, greedy ``generate`` up to
``--max-tokens`` new tokens stopping at the end-of-turn token, the last number of the reply as
the answer (commas dropped), compared as numbers with the gold answer after GSM8K's ``####``.
The mpd side is round 0 of ``mpd run -c configs/smollm2-gsm8k.yaml --rounds 0`` with
``evaluate.limit N``, read back with ``mpd sql``. Prints both accuracies and mean tokens, and
the problems where they disagree.

    python benchmarks/smollm2_agreement.py [--n 20] [--max-tokens 256] [-w runs/agreement]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GSM8K_TEST = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def last_number(text: str) -> str | None:
    found = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    return found[-1].replace(",", "").rstrip(".") if found else None


def same_number(a: str | None, b: str) -> bool:
    try:
        return a is not None and abs(float(a) - float(b)) < 1e-6
    except ValueError:
        return False


def plain(model_dir: Path, n: int, max_tokens: int) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = [json.loads(line) for line in GSM8K_TEST.read_text().splitlines()[:n]]
    out = []
    for row in rows:
        text = tok.apply_chat_template(
            [{"role": "user", "content": row["question"]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            gen = model.generate(
                ids,
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.eos_token_id,
            )
        new = gen[0, ids.shape[1] :].tolist()
        reply = tok.decode(new, skip_special_tokens=True)
        gold = row["answer"].rpartition("####")[2].strip().replace(",", "")
        out.append({"tokens": len(new), "correct": same_number(last_number(reply), gold)})
    return out


def through_mpd(ws: Path, n: int, max_tokens: int) -> list[dict]:
    sets = [f"evaluate.limit={n}", f"evaluate.max_tokens={max_tokens}", "evaluate.shard_size=8"]
    cmd = [sys.executable, "-m", "flows.cli", "run", "-c", "configs/smollm2-gsm8k.yaml"]
    cmd += ["-w", str(ws), "--rounds", "0", *(a for s in sets for a in ("--set", s))]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"mpd run failed:\n{done.stderr[-3000:]}")
    query = "select total_tokens, correct from evals where round = 0 order by problem_id"
    sql = [sys.executable, "-m", "flows.cli", "sql", "-w", str(ws), "--format", "json", query]
    rows = json.loads(subprocess.run(sql, cwd=ROOT, capture_output=True, text=True).stdout)
    return [{"tokens": r["total_tokens"], "correct": r["correct"]} for r in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("-w", "--workspace", type=Path, default=ROOT / "runs" / "agreement")
    args = p.parse_args()

    started = time.perf_counter()
    ours = through_mpd(args.workspace, args.n, args.max_tokens)
    t_mpd = time.perf_counter() - started
    model_dir = args.workspace / "models" / "smollm2"  # what mpd imported
    started = time.perf_counter()
    theirs = plain(model_dir, args.n, args.max_tokens)
    t_plain = time.perf_counter() - started

    def summary(rows: list[dict]) -> tuple[float, float]:
        return (
            sum(r["correct"] for r in rows) / len(rows),
            sum(r["tokens"] for r in rows) / len(rows),
        )

    (a_mpd, k_mpd), (a_plain, k_plain) = summary(ours), summary(theirs)
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"SmolLM2-135M-Instruct, first {args.n} GSM8K test problems, greedy, {args.max_tokens} tokens"
    )
    print(
        f"  mpd (eval stage):        accuracy {a_mpd:.3f}  mean tokens {k_mpd:6.1f}  ({t_mpd:.0f} s)"
    )
    print(
        f"  plain transformers:      accuracy {a_plain:.3f}  mean tokens {k_plain:6.1f}  ({t_plain:.0f} s)"
    )
    differ = [i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b]
    print(f"  problems that differ: {differ or 'none'}")


if __name__ == "__main__":
    main()
