"""Write a benchmark's results: `results.json` (documented fields), `results.md`, plots.

results.json fields:
- tool, schema, draftwise_version, date (UTC, ISO 8601), wall_seconds
- machine: cpu (model name from /proc/cpuinfo), cores, gpu (name or null), torch,
  transformers, python, platform, dtype, date
- settings: model, dtype, device, dataset, categories, limit, max_tokens, temperature,
  chat_template, warmup, batch_size (always 1)
- methods: [{label, kind ("draftwise" or "peer"), config (speculative config or null), peer}]
- categories: reported category names, in dataset order
- results: {label: {overall: ROW, categories: {category: ROW}, errors}} where ROW has
  questions, generations, output_tokens, seconds, tokens_per_second, speedup,
  mean_accepted_length, acceptance_rate, acceptance_per_position, target_passes_per_token,
  draft_time_share, exact_match, exact_match_compared (see draftwise.bench.summary)
- lossless: {greedy, ok, mismatches: [{method, kind, question_id, turn, first_difference, ...}]}
  (ok is about draftwise speculators only; a peer engine's differences are listed, not errors)
- notes: skipped peers and caveats; files: records, markdown, plots
"""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch

from draftwise.bench.dataset import Question
from draftwise.bench.methods import PLAIN, Method
from draftwise.bench.summary import summarize


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info(dtype: str, date: str) -> dict[str, Any]:
    import transformers

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "dtype": dtype,
        "date": date,
    }


def draftwise_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("draftwise")
    except PackageNotFoundError:
        return "unknown"


def write_reports(
    records: list[dict], methods: Sequence[Method], questions: Sequence[Question], settings, out_dir: Path,
    *, notes: Sequence[str] = (), seconds: float = 0.0, plots: bool = True,
) -> dict[str, Any]:
    summary = summarize(records, methods, questions)
    date = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    greedy = settings.temperature == 0
    own = [m for m in summary["mismatches"] if m["kind"] == "draftwise"]
    data: dict[str, Any] = {
        "tool": "draftwise bench",
        "schema": 1,
        "draftwise_version": draftwise_version(),
        "date": date,
        "wall_seconds": round(seconds, 2),
        "machine": machine_info(settings.dtype, date),
        "settings": {
            "model": settings.model, "dtype": settings.dtype, "device": settings.device,
            "quantization": settings.quantization,
            "dataset": settings.dataset, "categories": settings.categories, "limit": settings.limit,
            "max_tokens": settings.max_tokens, "temperature": settings.temperature, "sampling": settings.sampling,
            "chat_template": settings.chat_template, "warmup": settings.warmup, "batch_size": 1,
        },
        "methods": [{"label": m.label, "kind": m.kind, "config": m.config_dict(), "peer": m.peer} for m in methods],
        "categories": summary["categories"],
        "results": summary["results"],
        "lossless": {"greedy": greedy, "ok": not own if greedy else None, "mismatches": summary["mismatches"]},
        "notes": list(notes),
        "files": {"records": "records.jsonl", "markdown": "results.md", "plots": []},
    }
    if plots:
        from draftwise.bench.plots import write_plots

        data["files"]["plots"] = write_plots(data, out_dir)
    if greedy and own:
        shout_mismatches(own)
    (out_dir / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    (out_dir / "results.md").write_text(markdown(data))
    return data


def shout_mismatches(own: list[dict]) -> None:
    bar = "!" * 78
    methods = sorted({m["method"] for m in own})
    print(f"\n{bar}\nLOSSLESS CHECK FAILED: {len(own)} greedy generation(s) of {', '.join(methods)} differ from "
          f"plain decoding.\nThis is a bug in draftwise. First: {own[0]}\n{bar}\n", file=sys.stderr)


def fmt(value: Any, pattern: str = "{:.2f}", missing: str = "-") -> str:
    return missing if value is None else pattern.format(value)


def markdown(data: dict[str, Any]) -> str:
    """The report as Markdown: setup, overall table, speedup per category, acceptance per position."""
    s, mc = data["settings"], data["machine"]
    hw = mc["gpu"] or f"{mc['cpu']} ({mc['cores']} cores)"
    lines = [
        f"## Benchmark: {s['model']} ({s['dtype']}"
        f"{', ' + s['quantization'] + ' weights' if s.get('quantization', 'none') != 'none' else ''})", "",
        f"Machine: {hw}; torch {mc['torch']}, transformers {mc['transformers']}; {data['date']}.  ",
        f"Dataset: {Path(s['dataset']).name or '-'}"
        f"{' (categories: ' + ', '.join(s['categories']) + ')' if s['categories'] else ''}"
        f"{', first ' + str(s['limit']) + ' per category' if s['limit'] else ''}; "
        f"{'greedy' if s['temperature'] == 0 else 'temperature ' + str(s['temperature']) + ', ' + s.get('sampling', 'coupled') + ' sampling'}, batch 1, "
        f"max {s['max_tokens']} new tokens per turn, {'chat template' if s['chat_template'] else 'raw prompts'}.",
        "",
        "| method | tokens/s | speedup | mean accepted length | target passes / token | draft time | "
        "exact match vs plain |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    shown = [m for m in data["methods"] if data["results"][m["label"]]["overall"]["questions"]]
    for m in shown:
        row = data["results"][m["label"]]["overall"]
        lines.append(
            f"| {m['label']}{' (peer)' if m['kind'] == 'peer' else ''} | {fmt(row['tokens_per_second'])} | "
            f"{fmt(row['speedup'], '{:.2f}x')} | {fmt(row['mean_accepted_length'])} | "
            f"{fmt(row['target_passes_per_token'])} | {fmt(row['draft_time_share'], '{:.0%}')} | "
            f"{fmt(row['exact_match'], '{:.1%}')} |")
    cats = data["categories"]
    lines += ["", "Speedup over plain decoding by category:", "",
              "| method | " + " | ".join(cats) + " | overall |", "|---|" + "---:|" * (len(cats) + 1)]
    for m in shown:
        if m["label"] == PLAIN:
            continue
        res = data["results"][m["label"]]
        cells = [fmt(res["categories"][c]["speedup"], "{:.2f}x") for c in cats]
        lines.append(f"| {m['label']} | " + " | ".join(cells) + f" | {fmt(res['overall']['speedup'], '{:.2f}x')} |")
    spec = [m for m in shown if m["kind"] == "draftwise" and m["label"] != PLAIN]
    depth = max((len(data["results"][m["label"]]["overall"]["acceptance_per_position"] or []) for m in spec), default=0)
    if depth:
        lines += ["", "Acceptance by draft position (share of drafts reaching position j that were accepted there):",
                  "", "| method | " + " | ".join(str(j + 1) for j in range(depth)) + " |",
                  "|---|" + "---:|" * depth]
        for m in spec:
            acc = data["results"][m["label"]]["overall"]["acceptance_per_position"] or []
            lines.append(f"| {m['label']} | " + " | ".join(fmt(acc[j] if j < len(acc) else None, "{:.2f}")
                                                          for j in range(depth)) + " |")
    lossless = data["lossless"]
    lines.append("")
    if lossless["greedy"]:
        bad = [x for x in lossless["mismatches"] if x["kind"] == "draftwise"]
        lines.append("Lossless check: every speculative output equals plain decoding token for token."
                     if not bad else f"**LOSSLESS CHECK FAILED: {len(bad)} speculative output(s) differ from plain "
                                     "decoding (a bug).**")
    for note in data["notes"]:
        lines.append(f"- {note}")
    for p in data["files"]["plots"]:
        lines.append(f"\n![{Path(p).stem}]({p})")
    return "\n".join(lines) + "\n"
