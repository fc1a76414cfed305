"""Reports: report.json / report.md for one artifact, and side-by-side tables across artifacts."""

from __future__ import annotations

from pathlib import Path

from compressor.artifact import read_json
from compressor.errors import CompressorError
from compressor.serving import STACK_TITLES, STACKS, stack_support
from exporters.config_forms import compressed_config, form_of
from exporters.onnx.files import DECODER_FILE, ONNX_DIR

COLUMNS = (
    ("variant", lambda n, m: n),
    ("weights MB", lambda n, m: f"{m['weights_bytes'] / 1e6:.1f}" if m.get("weights_bytes") else "-"),
    ("params M", lambda n, m: f"{m['parameters'] / 1e6:.2f}"),
    ("perplexity", lambda n, m: f"{m['perplexity']:.2f}"),
    ("prefill s", lambda n, m: f"{m['speed']['prefill_seconds']:.3f}"),
    ("decode tok/s", lambda n, m: f"{m['speed']['decode_tokens_per_second']:.1f}"),
    ("peak RSS MB", lambda n, m: f"{m['speed']['peak_rss_mb']:.0f}"),
)


def markdown_table(rows: list[tuple[str, dict]], baseline: dict | None = None) -> str:
    headers = [c[0] for c in COLUMNS]
    if baseline is not None:
        headers += ["ppl ratio", "prefill speedup", "decode speedup"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for name, metrics in rows:
        cells = [fn(name, metrics) for _, fn in COLUMNS]
        if baseline is not None:
            cells += [f"{metrics['perplexity'] / baseline['perplexity']:.3f}",
                      f"{baseline['speed']['prefill_seconds'] / metrics['speed']['prefill_seconds']:.2f}x",
                      f"{metrics['speed']['decode_tokens_per_second'] / baseline['speed']['decode_tokens_per_second']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluation_note(metrics: dict) -> str:
    text = metrics["perplexity_text"]
    speed = metrics["speed"]
    return (f"Perplexity on {text['source']}, {text['windows']} windows x {text['seq_len']} tokens. "
            f"Speed: prompt of {speed['prompt_tokens']} tokens, {speed['new_tokens']} new tokens, greedy, "
            f"median of {speed['repeats']} repeats on {metrics.get('threads', '?')} threads. "
            f"Speed and peak resident memory are measured in a fresh process that loads the saved model.")


def quantization_summary(plan: dict | None) -> dict | None:
    """What the report says about quantization: widths, budget, and what was protected."""
    spec = (plan or {}).get("quantization")
    if not spec:
        return None
    widths: dict[str, int] = {}
    groups: dict[str, int] = {}  # only where the plan chose group sizes per unit
    for unit in spec["units"]:
        widths[str(unit["bits"])] = widths.get(str(unit["bits"]), 0) + 1
        if "group_size" in unit:
            group = "channel" if unit["group_size"] is None else f"g{unit['group_size']}"
            groups[group] = groups.get(group, 0) + 1
    return {"method": spec["method"], "allocate": spec["allocate"], "granularity": spec["granularity"],
            "units_per_width": widths, **({"units_per_group_size": groups} if groups else {}), "avg_bits": spec["budget"]["avg_bits"], "budget": spec["budget"]["requested"],
            "embedding_bits": spec["embedding"]["bits"], "predicted_tensor_bytes": spec["predicted_tensor_bytes"],
            "exact_weights": [{k: w[k] for k in ("module", "row", "column", "reason")} for w in spec["exact_weights"]],
            "pinned": [{"unit": u["key"], "reason": u["pinned"]} for u in spec["units"] if u.get("pinned")]}


def sparse_tokens_summary(plan: dict | None) -> dict | None:
    spec = (plan or {}).get("sparse_tokens")
    if not spec:
        return None
    return {k: spec[k] for k in ("method", "filter_layer", "keep_tokens", "keep_first", "keep_last", "chosen_by",
                                 "reason")}


def sharing_summary(plan: dict | None) -> dict | None:
    spec = (plan or {}).get("sharing")
    if not spec:
        return None
    shared = [g for g in spec["groups"] if g.get("rank")]
    return {k: spec[k] for k in ("fit", "projections", "grouping", "allocate", "reduction", "achieved_reduction",
                                 "dense_parameters", "parameters")} | {
        "groups": [{k: g[k] for k in ("projection", "layers", "rank", "residual_rank", "basis")} for g in shared],
        "dense_groups": [{"projection": g["projection"], "layers": g["layers"]} for g in spec["groups"] if not g.get("rank")]}


def serving_summary(folder: Path) -> dict:
    """Which stacks load the artifact in `folder`, from what it holds (compressor.serving): its
    config.json form, and per stack whether it loads and why not (or what loading takes)."""
    folder = Path(folder)
    data = read_json(folder / "config.json", "config.json")  # read once: the form and the config
    config = compressed_config(data, str(folder / "config.json"))
    form = form_of(data)
    support = stack_support(config, (folder / ONNX_DIR / DECODER_FILE).is_file(), form)
    return {"form": form, "architectures": list(data.get("architectures") or []),
            "stacks": {stack: {"loads": support[stack].loads, "notes": list(support[stack].notes)}
                       for stack in STACKS}}


def serving_lines(serving: dict) -> list[str]:
    lines = [f"Loads in (config.json in the {serving['form']} form):", "", "| stack | loads |", "|---|---|"]
    for stack in STACKS:
        entry = serving["stacks"][stack]
        verdict = "yes" if entry["loads"] else "no"
        lines.append(f"| {STACK_TITLES[stack]} | {verdict}{' (' + '; '.join(entry['notes']) + ')' if entry['notes'] else ''} |")
    return lines


def artifact_report(name: str, metrics: dict, original: dict | None, plan: dict | None,
                    folder: Path | None = None) -> dict:
    removal = (plan or {}).get("removal") or {}
    report = {"name": name, "compressed": metrics, "original": original,
              "removed_units": removal.get("removed", []) if isinstance(removal, dict) else []}
    if folder is not None:
        report["serving"] = serving_summary(folder)
    skipped = []
    for section, summary in (("sharing", sharing_summary), ("quantization", quantization_summary),
                             ("sparse_tokens", sparse_tokens_summary)):
        try:
            report[section] = summary(plan)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            # A plan edited by hand may lack fields that only the summary reads (apply never needs
            # them): the report says so instead of failing the evaluation.
            report[section] = None
            skipped.append(f"{section}: plan.json lacks what the summary reads ({type(exc).__name__}: {exc})")
    if skipped:
        report["summaries_skipped"] = skipped
    return report


def needle_table(needles: dict) -> str:
    lines = ["| prompt tokens | attention | needle accuracy | median TTFT s | TTFT speedup |", "|---|---|---|---|---|"]
    sparse = needles.get("sparse")
    for length, full in needles["full"].items():
        rows = [("full", full)] + ([(needles["sparse_tokens"]["method"], sparse[length])] if sparse else [])
        for label, row in rows:
            lines.append(f"| {length} | {label} | {row['accuracy']:.0%} of {row['cases']} | "
                         f"{row['median_ttft_seconds']:.2f} | "
                         f"{full['median_ttft_seconds'] / row['median_ttft_seconds']:.2f}x |")
    return "\n".join(lines)


def report_markdown(report: dict) -> str:
    rows = []
    if report.get("original"):
        rows.append(("original", report["original"]))
    rows.append((report["name"], report["compressed"]))
    removed = report.get("removed_units") or []
    lines = [f"# Report: {report['name']}", "", markdown_table(rows, report.get("original")), "",
             evaluation_note(report["compressed"]), ""]
    if removed:
        lines.append("Removed units: " + ", ".join(f"layer {u['layer']} {u['unit']}" for u in removed))
    for note in report.get("summaries_skipped") or []:
        lines.append(f"Summary left out, {note}")
    sharing = report.get("sharing")
    if sharing:
        lines += ["", f"Weight sharing ({sharing['fit']} fit, {sharing['grouping']} groups, ranks by "
                      f"{sharing['allocate']}): {sharing['achieved_reduction']:.1%} fewer parameters in "
                      f"{', '.join(sharing['projections'])} ({sharing['dense_parameters'] / 1e6:.2f}M -> "
                      f"{sharing['parameters'] / 1e6:.2f}M); {len(sharing['dense_groups'])} groups left dense.", "",
                  "| projection | layers | rank | basis |", "|---|---|---|---|"]
        lines += [f"| {g['projection']} | {', '.join(map(str, g['layers']))} | {g['rank']}"
                  f"{' + ' + str(g['residual_rank']) + ' per layer' if g['residual_rank'] else ''} | {g['basis']} |"
                  for g in sharing["groups"]]
    quantization = report.get("quantization")
    if quantization:
        widths = ", ".join(f"{n} x {b}-bit" for b, n in sorted(quantization["units_per_width"].items(),
                                                                key=lambda kv: int(kv[0])))
        lines += ["", f"Quantization: {quantization['method']}, allocated by {quantization['allocate']} per "
                      f"{quantization['granularity']}: {widths}; {quantization['avg_bits']:.3f} stored bits per "
                      f"linear weight (scales included); embedding {quantization['embedding_bits']}."]
        exact = quantization["exact_weights"]
        pinned = quantization["pinned"]
        lines.append("Protected: " + ("; ".join(
            [f"{w['module']}[{w['row']}, {w['column']}] kept exact ({w['reason']})" for w in exact]
            + [f"unit {p['unit']} pinned to the top width ({p['reason']})" for p in pinned]) or "nothing"))
    sparse = report.get("sparse_tokens")
    if sparse:
        lines += ["", f"Sparse-token filter: {sparse['method']} at layer {sparse['filter_layer']} ({sparse['reason']}); "
                      f"prompts longer than {sparse['keep_tokens']} tokens keep {sparse['keep_tokens']} of them "
                      f"(the first {sparse['keep_first']} and last {sparse['keep_last']} always)."]
    if report.get("serving"):
        lines += [""] + serving_lines(report["serving"])
    needles = report["compressed"].get("needles")
    if needles:
        lines += ["", f"Needle in a haystack ({needles['haystack']}, {len(needles['depths'])} depths x "
                      f"{needles['per_cell']} per length, greedy; TTFT is the prefill, filter included"
                      + ("; the layers were read from disk for every forward" if needles.get("weights") == "disk"
                         else "") + "):", "",
                  needle_table(needles)]
    return "\n".join(lines) + "\n"


def compare(folders: list[str]) -> str:
    rows, original, names = [], None, []
    for folder in folders:
        report = read_json(Path(folder) / "report.json", "report (run `compress eval` first)")
        if original is None and report.get("original"):
            original = report["original"]
        names.append(report.get("name") or Path(folder).name)
        rows.append((names[-1], report["compressed"]))
    if not rows:
        raise CompressorError("report: give at least one artifact folder")
    if original is not None:
        rows.insert(0, ("original", original))
    return (markdown_table(rows, original) + "\n\n" + evaluation_note(rows[-1][1]) + "\n\n"
            + serving_table(list(zip(names, folders))) + "\n")


def serving_table(folders: list[tuple[str, str]]) -> str:
    """Which stacks load each artifact ((name, folder) pairs), read from the folders as they are now
    (an ONNX export added after the report was written counts)."""
    lines = ["| variant | config form | " + " | ".join(STACK_TITLES[s] for s in STACKS) + " |",
             "|" + "---|" * (len(STACKS) + 2)]
    notes = []
    for name, folder in folders:
        serving = serving_summary(Path(folder))
        cells = []
        for stack in STACKS:
            entry = serving["stacks"][stack]
            cells.append("yes" if entry["loads"] else "no")
            if entry["notes"]:
                notes.append(f"- {name}, {STACK_TITLES[stack]}: {'; '.join(entry['notes'])}")
        lines.append(f"| {name} | {serving['form']} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ([""] + notes if notes else []))
