"""Layer-by-layer execution (compressor.execution) and the device / precision choices.

- A model read with `weights: disk` (decoder layers left in the source's safetensors, placed one at
  a time) gives exactly what the fully loaded model gives: the layer report, perplexity, GPTQ codes,
  removal scores, and whole compress runs byte for byte (Llama, Qwen2 with biases, Mistral with a
  window; sharded sources too).
- The layer-major runs equal the whole-model forward they replace.
- Hidden states spilled to disk come back exactly; the shard writer's bytes are safetensors' own.
- Needle answers (generation with a cache) from disk equal those in memory.
- A device that does not exist, a precision that is not one, and a source that cannot be read layer
  by layer are each one error line.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from compressor.analysis.collect import analyze_layers
from compressor.analysis.removal import Scorer, greedy_removal_order, removal_sensitivity
from compressor.cli import main
from compressor.errors import CompressorError
from compressor.evaluate import perplexity
from compressor.execution.hidden import HiddenStates, carried
from compressor.execution.offload import is_offloaded, offload_of, placed
from compressor.pipeline import compress
from compressor.placement import resolve, resolve_device, resolve_dtype
from compressor.recipe import parse_recipe
from compressor.sources import load_model
from compressor.transforms.quantize import QuantFormat
from compressor.transforms.quantize_model import quantize_model
from conftest import build_tiny_hf_model
from exporters.shards import write_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IDS = torch.randint(0, 512, (6, 24), generator=torch.Generator().manual_seed(3))


def both(folder):
    """The same source fully loaded and with its layers on disk."""
    memory = load_model(str(folder), quiet=True, weights="memory")
    disk = load_model(str(folder), quiet=True, weights="disk")
    assert not is_offloaded(memory.model) and is_offloaded(disk.model)
    return memory.model, disk.model


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_layer_report_and_perplexity_equal_the_loaded_model(tiny_model_folder, family):
    memory, disk = both(tiny_model_folder[family])
    assert disk.model.layers[0].self_attn.q_proj.weight.is_meta  # nothing read before a layer is placed
    stats_m, stats_d = [], []
    assert analyze_layers(memory, IDS, 4, True, stats_m) == analyze_layers(disk, IDS, 4, True, stats_d)
    assert stats_m == stats_d and len(stats_m) == memory.config.num_hidden_layers
    assert perplexity(memory, IDS, quiet=True) == perplexity(disk, IDS, quiet=True)
    assert all(p.is_meta for p in disk.model.layers.parameters())  # every layer released again


def test_layer_major_perplexity_equals_the_model_forward(tiny_model_folder):
    memory, _ = both(tiny_model_folder["llama"])
    total, count = 0.0, 0
    with torch.no_grad():
        for window in IDS:
            logits = memory(window[None]).logits[0, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum"))
            count += window.numel() - 1
    assert perplexity(memory, IDS, quiet=True) == math.exp(total / count)


def test_scores_and_gptq_codes_equal_the_loaded_model(tiny_model_folder):
    memory, disk = both(tiny_model_folder["qwen2"])
    assert removal_sensitivity(memory, IDS, 4, True) == removal_sensitivity(disk, IDS, 4, True)
    candidates = [(layer, kind) for layer in range(1, 5) for kind in ("attention", "mlp")]
    for criterion in ("finercut", "iterative"):
        assert greedy_removal_order(memory, IDS, candidates, 3, criterion, 4, True) == \
            greedy_removal_order(disk, IDS, candidates, 3, criterion, 4, True)
    formats = {f"model.layers.{layer}.{unit}.{name}": QuantFormat(4, 32, True)
               for layer in range(memory.config.num_hidden_layers)
               for unit, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                   ("mlp", ("gate_proj", "up_proj", "down_proj"))) for name in names}
    codes_m = quantize_model(memory, formats, "gptq", IDS, 4, quiet=True)
    codes_d = quantize_model(disk, formats, "gptq", IDS, 4, quiet=True)
    assert set(codes_m) == set(codes_d)
    for name, weight in codes_m.items():
        stored = codes_d[name].load()  # the offloaded run keeps its codes in the spill folder
        assert torch.equal(weight.codes, stored.codes) and torch.equal(weight.scale, stored.scale)
    # The quantized weights are what the next placement reads.
    with placed(disk, 2) as block:
        assert torch.equal(block.mlp.down_proj.weight, memory.model.layers[2].mlp.down_proj.weight)
    same = Scorer(memory, IDS, 4).divergence()
    assert same == Scorer(disk, IDS, 4).divergence() and abs(same) < 1e-9  # the model against itself


RECIPES = {
    "removal-gptq": """
calibration: {samples: 6, seq_len: 32}
remove: {method: similarity, attention: 1, mlp: 1}
quantize: {method: gptq, bits: [4, 8], group_size: 32, budget: {avg_bits: 6.0}, allocate: lim, embeddings: 8}
""",
    "finercut-sensitivity": """
calibration: {samples: 6, seq_len: 32}
remove: {method: finercut, any: 2, search_samples: 4, search_seq_len: 16}
quantize: {method: gptq, bits: [4, 8], group_size: 32, budget: {avg_bits: 6.0}, allocate: sensitivity,
           sensitivity_samples: 4, sensitivity_seq_len: 16, embeddings: keep}
""",
    "sparse-probe": """
calibration: {samples: 2, seq_len: 32}
sparse_tokens: {method: promptdistill, filter_layer: auto, keep_tokens: 64, keep_last: 8, probe: {samples: 2, tokens: 256}}
""",
    "removal-share-gptq": """
calibration: {samples: 4, seq_len: 32}
remove: {method: similarity, mlp: 1}
share: {projections: [q_proj, v_proj, gate_proj], reduction: 0.1, group_size: 2, rank_multiple: 8, residual_rank: 4}
quantize: {method: gptq, bits: [4, 8], group_size: channel, budget: {avg_bits: 6.0}, allocate: lim, embeddings: keep}
""",
    "removal-only": """
calibration: {samples: 4, seq_len: 32}
analysis: {removal_sensitivity: true}
remove: {method: iterative, attention: 1, search_samples: 4, search_seq_len: 16}
""",
}
EVALUATE = "evaluate: {windows: 2, seq_len: 32, speed: {prompt_tokens: 8, new_tokens: 2, repeats: 1}, compare_original: false}\n"


def run_recipe(tmp_path: Path, name: str, text: str, folder, weights: str, **extra) -> Path:
    path = tmp_path / f"{name}-{weights}.yaml"
    path.write_text(f"name: {name}\nweights: {weights}\n" + text + EVALUATE)
    return compress(path, model=str(folder), out=tmp_path / f"{name}-{weights}", quiet=True, log=lambda m: None,
                    **extra)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_compress_from_disk_writes_the_same_bytes(tmp_path, tiny_model_folder, name):
    folder = tiny_model_folder["mistral" if name == "removal-only" else "llama"]
    memory = run_recipe(tmp_path, name, RECIPES[name], folder, "memory")
    disk = run_recipe(tmp_path, name, RECIPES[name], folder, "disk")
    assert (memory / "model.safetensors").read_bytes() == (disk / "model.safetensors").read_bytes()
    assert (memory / "plan.json").read_text() == (disk / "plan.json").read_text()
    import json
    if "share" in name:  # the plan shares bases (else the comparison would not cover the fit)
        assert any(g["rank"] and len(g["layers"]) > 1 for g in json.loads((disk / "plan.json").read_text())["sharing"]["groups"])
    cost = json.loads((disk / "analysis.json").read_text())["cost"]
    assert cost["weights"] == "disk" and cost["device"] == "cpu" and "layer_report" in cost["stage_seconds"]
    assert not list(tmp_path.glob(".compressor-spill-*"))  # the spill folder is gone
    speeds = [json.loads((folder / "report.json").read_text())["compressed"]["speed"] for folder in (memory, disk)]
    assert [s["packed"] for s in speeds] == [False, True] and {s["device"] for s in speeds} == {"cpu"}


def test_sharded_source_read_layer_by_layer(tmp_path, tokenizer, tiny_model_folder):
    sharded = tmp_path / "sharded"
    build_tiny_hf_model("llama").save_pretrained(sharded, max_shard_size=60_000)
    tokenizer.save_pretrained(sharded)
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    memory, disk = both(sharded)
    assert len({s.path for s in offload_of(disk).stored.values()}) > 2  # layers from several shards
    assert perplexity(memory, IDS, quiet=True) == perplexity(disk, IDS, quiet=True)


def test_bfloat16_compute_keeps_a_narrower_embedding_and_runs(tmp_path, tokenizer):
    folder = tmp_path / "bf16"
    build_tiny_hf_model("llama").to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    fp32 = load_model(str(folder), quiet=True, weights="disk", placement=resolve("cpu", "float32")).model
    bf16 = load_model(str(folder), quiet=True, weights="disk", placement=resolve("cpu", "bfloat16")).model
    assert fp32.model.embed_tokens.weight.dtype == torch.bfloat16  # not widened to float32 in memory
    assert fp32.model.norm.weight.dtype == torch.float32
    resident = load_model(str(folder), quiet=True, weights="memory").model
    assert perplexity(fp32, IDS, quiet=True) == perplexity(resident, IDS, quiet=True)
    ppl_fp32, ppl_bf16 = perplexity(fp32, IDS, quiet=True), perplexity(bf16, IDS, quiet=True)
    assert abs(math.log(ppl_bf16) - math.log(ppl_fp32)) < 0.05  # bfloat16 rounding, nothing more
    with placed(bf16, 1) as block:
        assert block.mlp.up_proj.weight.dtype == torch.bfloat16


def test_hidden_states_spill_and_come_back_exactly():
    batches = [torch.randn(2, 5, 8) for _ in range(4)]
    kept = carried(batches, budget=2 * 5 * 8 * 4)  # room for one batch in memory
    assert kept.spilled == 3 and len(kept) == 4
    assert all(torch.equal(a, b) for a, b in zip(batches, kept))
    folder = Path(kept._folder)
    kept.close()
    assert not folder.exists()
    assert HiddenStates(budget=0).spilled == 0


def test_shard_writer_writes_safetensors_bytes(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"b.w": torch.randint(-5, 5, (3, 7), dtype=torch.int32, generator=g), "a.w": torch.randn(2, 3, generator=g),
               "c": torch.ones(5, dtype=torch.int8), "aa": torch.randn(4, generator=g).bfloat16(),
               "z": torch.ones(2, dtype=torch.float64), "e": torch.zeros(0), "h": torch.randn(3, generator=g).half(),
               "i": torch.tensor([1, 2]), "bo": torch.tensor([True, False]), "u": torch.tensor([3], dtype=torch.uint8),
               "s": torch.tensor([3], dtype=torch.int16)}
    for metadata in (None, {"format": "pt"}):
        save_file(tensors, str(tmp_path / "a.safetensors"), metadata=metadata)
        write_file(tmp_path / "b.safetensors", tensors, metadata)
        assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_device_and_precision_errors(capsys, tmp_path, tiny_model_folder):
    if not torch.cuda.is_available():
        with pytest.raises(CompressorError, match=r"^device: cuda does not exist here: .*; allowed here: auto, cpu$"):
            resolve_device("cuda")
        assert resolve_device("auto") == torch.device("cpu")
        assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    else:
        count = torch.cuda.device_count()
        with pytest.raises(CompressorError, match=f"cuda:{count} does not exist here"):
            resolve_device(f"cuda:{count}")
    with pytest.raises(CompressorError, match=r"'gpu' is not a device; allowed: auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")
    with pytest.raises(CompressorError, match=r"'fp8' is not a precision"):
        resolve_dtype("fp8", torch.device("cpu"))
    with pytest.raises(CompressorError, match=r"device: 'cuda:x' is not a device"):
        parse_recipe({"name": "r", "device": "cuda:x"}, "recipe")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\n")
    if not torch.cuda.is_available():
        assert main(["--recipe", str(recipe), "--device", "cuda:3", "--out", str(tmp_path / "o")]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cuda:3 does not exist here" in err[0]
        assert not (tmp_path / "o").exists()


def test_needles_from_disk_answer_as_in_memory(tmp_path, tiny_model_folder):
    import json

    text = """
calibration: {samples: 4, seq_len: 32}
remove: {method: similarity, attention: 1, protect: {first: 0, last: 0}}
sparse_tokens: {method: promptdistill, filter_layer: 1, keep_tokens: 96, keep_last: 8}
quantize: {method: rtn, bits: [4], group_size: 32, budget: {avg_bits: 4.6}}
"""
    evaluate = "evaluate: {text: embedded, windows: 2, seq_len: 32, compare_original: false, " \
               "speed: {prompt_tokens: 8, new_tokens: 2, repeats: 1}, " \
               "needles: {text: embedded, lengths: [300], depths: 2, per_cell: 1, max_new_tokens: 4}}\n"
    needles = {}
    for weights in ("memory", "disk"):
        path = tmp_path / f"needles-{weights}.yaml"
        path.write_text(f"name: needles\nweights: {weights}\n" + text + evaluate)
        out = compress(path, model=str(tiny_model_folder["llama"]), out=tmp_path / weights, quiet=True,
                       log=lambda m: None)
        needles[weights] = json.loads((out / "report.json").read_text())["compressed"]["needles"]
    assert needles["disk"]["weights"] == "disk" and needles["memory"]["weights"] == "memory"
    for variant in ("full", "sparse"):
        for summary in (needles["memory"][variant], needles["disk"][variant]):
            assert summary["300"]["cases"] == 2
        strip = [{length: {k: v for k, v in row.items() if k != "median_ttft_seconds"} for length, row in n[variant].items()}
                 for n in (needles["memory"], needles["disk"])]
        assert strip[0] == strip[1]


def test_gguf_refuses_disk(tmp_path):
    with pytest.raises(CompressorError, match=r"weights: disk cannot read .*\.gguf one layer at a time"):
        gguf = tmp_path / "m.gguf"
        gguf.write_bytes(b"GGUF")
        load_model(str(gguf), weights="disk")


def test_analyze_and_apply_read_layers_from_disk_alike(tmp_path, tiny_model_folder, capsys):
    import json

    folder = str(tiny_model_folder["llama"])
    recipe = tmp_path / "plan-recipe.yaml"
    recipe.write_text("name: p\nremove: {method: similarity, attention: 1}\n"
                      "quantize: {method: rtn, bits: [4], group_size: 32, budget: {avg_bits: 5.0}, allocate: uniform}\n")
    layers = {}
    for weights in ("memory", "disk"):
        out = tmp_path / f"analysis-{weights}"
        assert main(["analyze", "--model", folder, "--out", str(out), "--recipe", str(recipe), "--samples", "4",
                     "--seq-len", "16", "--weights", weights, "--device", "cpu", "--quiet"]) == 0
        analysis = json.loads((out / "analysis.json").read_text())
        layers[weights] = (analysis["layers"], analysis["quantization"])
    assert layers["memory"] == layers["disk"]
    plan = tmp_path / "plan.json"
    assert main(["plan", "--recipe", str(recipe), "--analysis", str(tmp_path / "analysis-disk" / "analysis.json"),
                 "--out", str(plan)]) == 0
    written = {}
    for weights in ("memory", "disk"):
        out = tmp_path / f"applied-{weights}"
        assert main(["apply", "--plan", str(plan), "--model", folder, "--out", str(out), "--weights", weights,
                     "--quiet"]) == 0
        written[weights] = (out / "model.safetensors").read_bytes()
    assert written["memory"] == written["disk"]
    capsys.readouterr()
