"""The `compress` command: argument parsing and printing only; the work is in compressor.pipeline.

    compress --recipe R [--model SOURCE] [--out DIR] [--force] [--quiet]
    compress analyze --model SOURCE --out DIR [--recipe R] [--samples N] [--seq-len L] [--sensitivity]
    compress plan --recipe R --analysis DIR/analysis.json --out plan.json
    compress apply --plan plan.json --model SOURCE --out DIR [--force] [--max-shard-bytes N]
    compress eval DIR [--recipe R] [--no-original]
    compress report DIR [DIR ...]
    compress select DIR (--prompt TEXT | --prompt-file FILE) [--chat] [--positions]
    compress export onnx DIR [--tolerance T] [--matmul-accuracy fp32|int8]
    compress export tensorrt DIR [--library auto|tensorrt|tensorrt-rtx] [--token-selection auto|plugin|inlined] [--precision float16|bfloat16|float32] [--batch MIN,OPT,MAX] [--sequence ...] [--past ...]
    compress verify DIR [--update]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from pathlib import Path

from compressor import pipeline
from compressor.analysis.render import layer_table
from compressor.artifact import check_destination, read_json, staged_folder
from compressor.errors import CompressorError, MissingRecord, one_line
from compressor.plan import load_plan, save_plan
from compressor.process import quiet_transformers
from compressor.recipe import Recipe, default, load_recipe, parse_recipe
from compressor.report import compare
from compressor.runtime import load
from exporters.onnx import DEFAULT_TOLERANCE


def _shard_bytes(text: str) -> int:
    """--max-shard-bytes: an integer of at least 1000000 bytes."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1_000_000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; allowed: an integer of bytes >= 1000000")
    return value


SUBCOMMANDS = ("analyze", "plan", "apply", "eval", "report", "select", "export", "verify")


def _main_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compress", description="Compress a transformer language model with a recipe.",
                                epilog=f"sub-commands: {', '.join(SUBCOMMANDS)} (compress SUBCOMMAND --help)")
    p.add_argument("--recipe", required=True, help="recipe YAML (see recipes/)")
    p.add_argument("--model", help="model source: 'embedded' (default), a folder, a .gguf file, or a hub id")
    p.add_argument("--out", help="artifact folder (default: out/RECIPE_NAME)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars or step messages")
    _placement_arguments(p)
    return p


def _placement_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="where the model computes: auto, cpu, cuda or cuda:N (default: the recipe's, auto)")
    p.add_argument("--weights", choices=["auto", "memory", "disk"],
                   help="memory: load every weight; disk: read the decoder layers one at a time from the source's "
                        "safetensors (default: the recipe's, auto)")


def _sub_parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"compress {command}")
    if command == "analyze":
        p.add_argument("--model", default="embedded", help="model source (default: embedded)")
        p.add_argument("--out", required=True, help="folder for analysis.json and analysis.png")
        p.add_argument("--recipe", help="take calibration settings (and greedy searches) from this recipe")
        p.add_argument("--text", help="calibration text: 'embedded', a .txt/.jsonl file, or hf:NAME:SPLIT")
        p.add_argument("--samples", type=int, help="calibration windows")
        p.add_argument("--seq-len", type=int, help="tokens per calibration window")
        p.add_argument("--sensitivity", action="store_true", help="also measure each unit's removal sensitivity")
        p.add_argument("--force", action="store_true")
        _placement_arguments(p)
    elif command == "plan":
        p.add_argument("--recipe", required=True)
        p.add_argument("--analysis", required=True, help="analysis.json written by `compress analyze`")
        p.add_argument("--out", required=True, help="plan.json to write")
    elif command == "apply":
        p.add_argument("--plan", required=True)
        p.add_argument("--model", default="embedded")
        p.add_argument("--out", required=True)
        p.add_argument("--force", action="store_true")
        _placement_arguments(p)
        p.add_argument("--max-shard-bytes", type=_shard_bytes, default=default(Recipe, "max_shard_bytes"),
                       help="split weights above this size into shards (default: 5000000000)")
    elif command == "eval":
        p.add_argument("folder")
        p.add_argument("--recipe", help="evaluation settings (default: the artifact's recipe.yaml)")
        p.add_argument("--no-original", action="store_true", help="do not evaluate the original model")
    elif command == "report":
        p.add_argument("folders", nargs="+")
    elif command == "select":
        p.description = "Print what the artifact's sparse-token filter keeps of a prompt."
        p.add_argument("folder")
        given = p.add_mutually_exclusive_group(required=True)
        given.add_argument("--prompt", help="the prompt text")
        given.add_argument("--prompt-file", help="a UTF-8 text file holding the prompt")
        p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template first")
        p.add_argument("--positions", action="store_true", help="also print the kept token positions")
    elif command == "export":
        p.description = "Export an artifact folder to another format (written inside it, e.g. DIR/onnx/)."
        p.add_argument("format", choices=["onnx", "tensorrt"],
                       help="the format to write (tensorrt: engines built from the artifact's ONNX export)")
        p.add_argument("folder", help="the artifact folder")
        p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                       help=f"largest |logit difference| from the torch model allowed at export (default {DEFAULT_TOLERANCE:g})")
        p.add_argument("--matmul-accuracy", default=default(Recipe, "onnx").matmul_accuracy, choices=["fp32", "int8"],
                       help="onnx: the compute recorded for ONNX Runtime's fused quantized MatMul: fp32 (the torch "
                       "model's logits; default) or int8 (activations quantized on the fly: faster, logits not equal)")
        trt = default(Recipe, "tensorrt")
        p.add_argument("--library", default=trt.library, help="tensorrt: auto (full TensorRT when installed), "
                       "tensorrt or tensorrt-rtx")
        p.add_argument("--token-selection", default=trt.token_selection,
                       help="tensorrt: the sparse prefill's token selection: plugin (the SelectTokens plugin, "
                       "compiled with nvcc and TensorRT's C++ headers), inlined (standard layers), or auto "
                       "(the plugin when it can be built; default)")
        p.add_argument("--precision", default=trt.precision, choices=["float16", "bfloat16", "float32"],
                       help="tensorrt: the matrix products' activations and the KV cache (default %(default)s; "
                       "norms, rotary angles and softmax stay float32)")
        for axis, help_text in (("batch", "prompts per call"), ("sequence", "new tokens per call"),
                                ("past", "cached tokens")):
            p.add_argument(f"--{axis}", default=",".join(map(str, getattr(trt, axis))),
                           help=f"tensorrt: optimization profile of {help_text}, MIN,OPT,MAX (default %(default)s)")
    elif command == "verify":
        p.description = ("Check an artifact folder: every file against manifest.json (size and SHA-256), and its "
                         "config and weights against each other.")
        p.add_argument("folder", help="the artifact folder")
        p.add_argument("--update", action="store_true",
                       help="accept the files as they are now: check config and weights, then write a new manifest")
    p.add_argument("--quiet", action="store_true")
    return p


def _triple(text: str, axis: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3:
        raise CompressorError(f"--{axis}: {text!r} is not MIN,OPT,MAX (three integers, e.g. 1,128,2048)")
    return values


def _log(quiet: bool):
    return (lambda *a, **k: None) if quiet else (lambda msg: print(msg, file=sys.stderr))


def run(argv: list[str]) -> int:
    if argv and argv[0] in SUBCOMMANDS:
        command, args = argv[0], _sub_parser(argv[0]).parse_args(argv[1:])
    else:
        command, args = "compress", _main_parser().parse_args(argv)
    log = _log(args.quiet)

    if command == "compress":
        out = pipeline.compress(args.recipe, args.model, args.out, args.force, args.quiet, log, args.device, args.weights)
        print((out / "report.md").read_text())
        print(f"artifact: {out}")
    elif command == "analyze":
        recipe = load_recipe(args.recipe) if args.recipe else Recipe()
        overrides = {k: v for k, v in (("text", args.text), ("samples", args.samples), ("seq_len", args.seq_len)) if v is not None}
        data = recipe.model_dump()
        data["calibration"].update(overrides)
        data["analysis"]["removal_sensitivity"] |= args.sensitivity
        data.update({k: v for k, v in (("device", args.device), ("weights", args.weights)) if v is not None})
        recipe = parse_recipe(data, "command line")  # validates the overrides too
        quiet_transformers()
        check_destination(args.out, args.force)
        with staged_folder(args.out, args.force) as staging:
            analysis = pipeline.analyze_source(args.model, recipe, args.out, args.quiet)
            pipeline.write_analysis(analysis, staging)
        print(layer_table(analysis))
        print(f"analysis: {Path(args.out) / 'analysis.json'} (heat map: analysis.png)")
    elif command == "plan":
        recipe = load_recipe(args.recipe)
        analysis = read_json(Path(args.analysis), "analysis")
        try:
            plan = pipeline.make_plan(recipe, analysis)
        except MissingRecord as exc:
            source = (analysis.get("model") or {}).get("source") or "SOURCE"
            raise exc.naming(args.analysis, f"compress analyze --recipe {args.recipe} --model {source} "
                                            "--out DIR") from None
        save_plan(plan, args.out)
        removed = (plan.get("removal") or {}).get("removed", [])
        print(f"plan: {len(removed)} units removed -> {args.out}")
        for u in removed:
            print(f"  layer {u['layer']:>3} {u['unit']:<9} {plan['layers'][u['layer']]['notes']}")
        sparse = plan.get("sparse_tokens")
        if sparse:
            print(f"sparse tokens: {sparse['method']} at layer {sparse['filter_layer']} ({sparse['reason']}), "
                  f"keeps {sparse['keep_tokens']} tokens")
        if plan.get("sharing"):
            print(pipeline.sharing_summary(plan["sharing"]))
            for group in plan["sharing"]["groups"]:
                rank = f"rank {group['rank']}" if group["rank"] else "dense"
                print(f"  {group['projection']:<10} layers {','.join(map(str, group['layers'])):<16} {rank:<9} "
                      f"{group['parameters']:>10,} of {group['dense_parameters']:,} parameters, "
                      f"expected error {group['expected_error']:.4f}")
        if plan.get("quantization"):
            print(pipeline.quantization_summary(plan["quantization"]))
            for unit in plan["quantization"]["units"]:
                # Option labels are a width ("4") or a width and group size ("4/channel").
                costs = ", ".join(f"{b}{'' if '/' in b else '-bit'} {c:.3g}" for b, c in unit["costs"].items())
                pinned = f"  pinned: {unit['pinned']}" if unit.get("pinned") else ""
                group = "" if "group_size" not in unit else \
                    f" {'channel' if unit['group_size'] is None else 'g' + str(unit['group_size'])}"
                print(f"  unit {unit['key']:<12} {unit['bits']}-bit{group}  cost by option: {costs}{pinned}")
    elif command == "apply":
        plan = load_plan(args.plan)
        out = pipeline.apply_plan_to_source(plan, args.model, args.out, args.force, args.quiet, args.max_shard_bytes,
                                            args.device or "auto", args.weights or "auto")
        print(f"artifact: {out} (evaluate it with: compress eval {out})")
    elif command == "eval":
        pipeline.evaluate_artifact(Path(args.folder), args.recipe, not args.no_original, args.quiet, log)
        print((Path(args.folder) / "report.md").read_text())
    elif command == "report":
        print(compare(args.folders))
    elif command == "select":
        quiet_transformers()
        _print_selection(args)
    elif command == "export":
        quiet_transformers()
        settings = None
        if args.format == "tensorrt":
            settings = parse_recipe({"name": "export", "tensorrt": {
                "library": args.library, "token_selection": args.token_selection,
                "precision": args.precision, **{axis: _triple(getattr(args, axis), axis) for axis in ("batch", "sequence", "past")}}},
                "compress export tensorrt").tensorrt
        out = pipeline.export_artifact(Path(args.folder), args.format, args.tolerance, log, settings,
                                       args.matmul_accuracy)
        print(f"{args.format} export: {out}")
    elif command == "verify":
        quiet_transformers()
        print(pipeline.verify_artifact(Path(args.folder), args.update))
    return 0


def _print_selection(args) -> None:
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise CompressorError(f"prompt file not found: {path}")
        prompt = path.read_text(encoding="utf-8", errors="replace")
    else:
        prompt = args.prompt
    artifact = load(args.folder)
    settings = artifact.sparse_settings(True)
    selection = artifact.select(prompt, chat=args.chat)
    tokens = selection["prompt_tokens"]
    if selection["selected_positions"] is None:
        print(f"{tokens} prompt tokens: not more than keep_tokens={settings.keep_tokens}, the whole prompt runs")
        return
    kept = selection["selected_positions"]
    print(f"{settings.method} at layer {settings.filter_layer} kept {len(kept)} of {tokens} prompt tokens "
          f"(gaps shown as [...]):")
    print(selection["kept_text"])
    if args.positions:
        print("positions:", " ".join(map(str, kept)))


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread so that staging folders are removed as on Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


@contextlib.contextmanager
def _signals_interrupt():
    wanted = (signal.SIGTERM, signal.SIGHUP)
    try:
        previous = {s: signal.signal(s, _raise_terminated) for s in wanted}
    except ValueError:  # not the main thread: leave the handlers alone
        yield
        return
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        with _signals_interrupt():
            return run(argv)
    except CompressorError as exc:
        print(f"compress: error: {one_line(' '.join(str(exc).split(chr(10))), 2000)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        return 0
    except KeyboardInterrupt:
        print("compress: interrupted; nothing was written at the destination", file=sys.stderr)
        return 130
    except Terminated as exc:
        print(f"compress: terminated by signal {exc.signum}; nothing was written at the destination", file=sys.stderr)
        return 128 + exc.signum
    except MemoryError:
        print("compress: error: out of memory (try fewer calibration samples, a shorter seq_len or a smaller "
              "batch_size)", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"compress: error: {one_line(exc.strerror or exc, 300)}{where}", file=sys.stderr)
        return 2
    except Exception as exc:  # a defect: still one line, the traceback on request
        if os.environ.get("COMPRESSOR_DEBUG"):
            raise
        print(f"compress: error: internal error ({type(exc).__name__}: {one_line(exc, 200)}); please report it "
              "with the traceback that COMPRESSOR_DEBUG=1 prints", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
