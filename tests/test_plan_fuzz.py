"""Fuzzing plans through the real command line, `compress apply --plan P --model TINY --out D`.

A valid plan.json is made once from the tiny Llama (removal, sparse tokens, activation-aware
sharing, round-to-nearest quantization, one weight kept exact); seeded edits of it (the fields
`apply` reads set to neighbouring, wrong-typed, out-of-range or absurd values, sections deleted or
replaced, unknown values anywhere) and hostile files (not JSON, deeply nested, huge) are applied.
For every case: exit status 0 or 2; on 2 exactly one short `compress: error: ` line, nothing at D
and no hidden `.D.*` staging folder beside it; never a traceback or a hang. Then the same for
analyses edited before `compress plan`.
"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
from pathlib import Path

import pytest

import compressor

from compressor import cli
from compressor.data import embedded_text
from test_recipe_fuzz import FUZZ_RECIPE, NASTY, Tally, all_paths, at

SEED = 4242


@pytest.fixture(autouse=True)
def defects_raise(monkeypatch):
    monkeypatch.setenv("COMPRESSOR_DEBUG", "1")


class Base:
    """The tiny model, a calibration text, the analysis, a valid plan and where cases go."""

    def __init__(self, folder: Path, model: Path):
        self.folder, self.model = folder, model
        self.text = folder / "calibration.txt"
        self.text.write_text(embedded_text()[:20_000])
        self.recipe = folder / "fuzz.yaml"
        self.recipe.write_text(FUZZ_RECIPE.replace("text: embedded, samples: 2", f"text: {self.text}, samples: 2")
                               .replace("fit: weight", "fit: activation"))
        self.analysis = folder / "analysis" / "analysis.json"
        assert cli.main(["analyze", "--model", str(model), "--recipe", str(self.recipe),
                         "--out", str(self.analysis.parent), "--quiet"]) == 0
        made = folder / "made.json"
        assert cli.main(["plan", "--recipe", str(self.recipe), "--analysis", str(self.analysis),
                         "--out", str(made)]) == 0
        plan = json.loads(made.read_text())
        down = next(n for n in plan["quantization"]["linears"] if n.endswith("mlp.down_proj"))
        plan["quantization"]["exact_weights"] = [{"module": down, "row": 1, "column": 2, "weight": 0.0,
                                                  "reason": "fuzz"}]
        self.plan = plan
        self.outs = folder / "outs"
        self.outs.mkdir()


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model_folder, one_torch_thread):
    return Base(tmp_path_factory.mktemp("plan-fuzz"), tiny_model_folder["llama"])


def leftovers(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def apply_case(tally: Tally, capsys, base: Base, label: str, content: bytes) -> tuple[int | None, str]:
    number = tally.cases + 1
    path = base.folder / f"plan{number}.json"
    path.write_bytes(content)
    out = base.outs / f"case{number}"
    code, line = tally.run(capsys, f"#{number} {label}", ["apply", "--plan", path, "--model", base.model, "--out", out,
                                                          "--quiet"])
    if code == 0:
        try:  # what was published loads: manifest, config and weights consistent
            compressor.load(out)
        except Exception as exc:
            tally.failures.append(f"#{number} {label}: exit 0 but the artifact does not load ({exc})")
        shutil.rmtree(out, ignore_errors=True)
    elif out.exists() or leftovers(out):
        tally.failures.append(f"#{number} {label}: after an error, left {out.exists() and out.name} {leftovers(out)}")
    path.unlink()
    return code, line


def dump(plan) -> bytes:
    return json.dumps(plan, indent=1).encode()


# ---- edits of the fields `apply` reads ----------------------------------------------------------

def calibration_pool(base: Base, key: str) -> list:
    return {"text": [str(base.text), "embedded", "/no/such/text.txt", "", "a\x00b", 3, None, ["x"]],
            "samples": [1, 2, 3, 0, -1, 10**6, "2", 2.5, None],
            "seq_len": [8, 16, 33, 600, 7, 0, 10**6, None, "32"],
            "seed": [0, 1, -1, 2**40, 2**70, "0", None, 1.5]}[key]


def targeted_edit(plan: dict, base: Base, rng: random.Random) -> str:
    """Sets one field `apply` reads to a value drawn from a pool of good, neighbouring and bad ones."""
    n = len(base.plan["layers"])
    names = list(base.plan["quantization"]["linears"])
    groups = base.plan["sharing"]["groups"]
    shared = [i for i, g in enumerate(groups) if g["rank"]]
    removed = [f"model.layers.{d['layer']}.{'self_attn.q_proj' if k == 'attention' else 'mlp.up_proj'}"
               for d in base.plan["layers"] for k in ("attention", "mlp") if d[k] == "remove"]
    dense_of_shared = [f"model.layers.{groups[i]['layers'][0]}.self_attn.{groups[i]['projection']}" for i in shared]
    j = rng.choice(shared)
    options = [
        (("layers", rng.randrange(n), rng.choice(["attention", "mlp"])),
         ["keep", "remove", "absent", "drop", "", None, 1, True]),
        (("layers", rng.randrange(n), "layer"), [0, 1, -1, 99, "0", None, True, 1.0]),
        (("quantization", "linears", rng.choice(names), "bits"), [2, 3, 4, 5, 6, 8, 7, 0, 16, -4, "4", 4.0, None, True, [4]]),
        (("quantization", "linears", rng.choice(names), "group_size"),
         [32, 64, 128, None, 16, 0, -64, "64", 96, 10**9, True]),
        (("quantization", "linears", rng.choice(names), "symmetric"), [True, False, 1, 0, "yes", None]),
        (("quantization", "linears", rng.choice(names)), [None, {}, [], "4bit", {"bits": 4}]),
        (("quantization", "linears", rng.choice(removed + dense_of_shared + [
            "model.layers.99.mlp.down_proj", "model.shared_bases.q_proj_g7", "lm_head", "model.embed_tokens",
            "model.layers.0.mlp.down_proj.coefficients", "", "x" * 500])),
         [{"bits": 4, "group_size": 32, "symmetric": True}]),
        (("quantization", "embedding", "bits"), [2, 3, 4, 6, 8, "keep", 7, None, "8"]),
        (("quantization", "embedding", "group_size"), [32, 64, None, 48, 128, 0]),
        (("quantization", "embedding"), [None, {}, "keep", {"bits": "keep"}]),
        (("quantization", "exact_weights", 0, rng.choice(["row", "column"])),
         [0, 1, 63, 64, 127, 128, -1, 10**12, "1", None, 1.5, True]),
        (("quantization", "exact_weights", 0, "module"), names[:3] + ["model.layers.0.mlp.nothing", None, 3]),
        (("quantization", "exact_weights"), [[], None, {}, "x", [{}], [None]]),
        (("quantization", "method"), ["rtn", "gptq", "awq", None, 1]),
        (("quantization", "damp"), [0.1, 0.01, 0, -1, 10**9, math.nan, math.inf, "0.1", None, True]),
        (("quantization", "act_order"), [True, False, "yes", None]),
        (("quantization", "hessian_tokens"), ["equal", "raw", "both", None]),
        (("quantization", "predicted_tensor_bytes"), [0, 10, -1, 10**30, 1.5, None, "1"]),
        (("quantization", "calibration", k := rng.choice(["text", "samples", "seq_len", "seed"])),
         calibration_pool(base, k)),
        (("sharing", "groups", j, "rank"), [16, 32, 48, 64, 65, 128, 0, -1, 10**9, None, "32", 32.0, True]),
        (("sharing", "groups", j, "layers"),
         [[0, 1], [1, 0], [0, 0], [], [0, 4], [0, 99], [-1], "0", None, [0.5], [0, 1, 2, 3, 5], [[0]]]),
        (("sharing", "groups", j, "projection"), ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "x_proj", None, 1]),
        (("sharing", "groups", j, "basis"), ["q_proj_g0", "q_proj_g1", "q_proj_g9", "k_proj_g0", "x.y", "", None, 7]),
        (("sharing", "groups", j, "residual_rank"), [0, 1, 8, 32, 64, 65, 10**6, -1, None, "2"]),
        (("sharing", "fit"), ["activation", "weight", "magic", None]),
        (("sharing", "calibration", k2 := rng.choice(["text", "samples", "seq_len", "seed"])),
         calibration_pool(base, k2)),
        (("sharing", "groups"), [[], None, {}, "x", [None], [{}]]),
        (("sparse_tokens", "method"), ["gemfilter", "promptdistill", "snapkv", None]),
        (("sparse_tokens", "filter_layer"), [0, 1, 2, 3, 4, 5, 6, -1, "2", None, 2.0]),
        (("sparse_tokens", "keep_tokens"), [2, 9, 64, 1, 0, 10**9, "64", None]),
        (("sparse_tokens", "keep_first"), [0, 1, 63, 64, -1, None]),
        (("sparse_tokens", "keep_last"), [1, 8, 0, 64, 100, None]),
        (("sparse_tokens", "pool_width"), [1, 3, 5, 4, 0, -3, 2049, None, "5"]),
        (("sparse_tokens",), [None, {}, [], "on", 1]),
        (("model",), [None, {}, "x", [], 3, {"source": 1}]),
        (("format",), ["compressor-plan/2", None, 1]),
        (("quantization",), [None, {}, [], "x"]),
        (("sharing",), [None, {}, [], "x"]),
    ]
    path, pool = rng.choice(options)
    value = copy.deepcopy(rng.choice(pool))
    try:
        parent = at(plan, path[:-1])
        if isinstance(parent, dict) or (isinstance(parent, list) and -len(parent) <= path[-1] < len(parent)):
            parent[path[-1]] = value
    except (KeyError, IndexError, TypeError):
        return "skipped"  # an earlier edit of this case removed the parent
    return ".".join(map(str, path))[:60] + "=" + repr(value)[:30]


def generic_edit(plan: dict, rng: random.Random) -> str:
    """Deletes any field, or replaces it with an arbitrary value, or appends/drops a layer."""
    paths = [p for p in all_paths(plan) if p]
    kind = rng.choice(["delete", "replace", "replace", "drop layer", "add layer"])
    if kind == "drop layer":
        plan["layers"].pop(rng.randrange(len(plan["layers"])))
        return kind
    if kind == "add layer":
        plan["layers"].append({"layer": len(plan["layers"]), "attention": "keep", "mlp": "keep", "notes": ""})
        return kind
    path = rng.choice(paths)
    parent = at(plan, path[:-1])
    if kind == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = copy.deepcopy(rng.choice(NASTY))
    return f"{kind} {'.'.join(map(str, path))[:60]}"


def hostile_plans(base: Base) -> list[tuple[str, bytes]]:
    good = dump(base.plan)
    deep_notes = copy.deepcopy(base.plan)
    deep_notes["layers"][0]["notes"] = json.loads("[" * 500 + "]" * 500)
    return [
        ("the plan itself", good),
        ("byte-order mark", b"\xef\xbb\xbf" + good),
        ("not JSON", b"layers: [keep]\n"),
        ("empty", b""),
        ("a list", b"[1, 2]"),
        ("null", b"null"),
        ("a string", b'"compressor-plan/1"'),
        ("truncated", good[: len(good) // 2]),
        ("deep nesting", b"[" * 100_000 + b"]" * 100_000),
        ("deep nesting in notes", dump(deep_notes)),
        ("huge (17 MB)", good[:-2] + b', "padding": "' + b"p" * 17_000_000 + b'"}'),
        ("duplicate key", good.replace(b'"attention": "keep"', b'"attention": "remove", "attention": "keep"', 1)),
        ("NaN damp", good.replace(b'"damp": 0.1', b'"damp": NaN', 1)),
        ("Infinity damp", good.replace(b'"damp": 0.1', b'"damp": Infinity', 1)),
        ("integer of 5000 digits", good.replace(b'"damp": 0.1', b'"damp": ' + b"9" * 5000, 1)),
        ("latin-1 byte", good.replace(b'"notes": ""', b'"notes": "\xe9"', 1)),
        ("UTF-16", good.decode().encode("utf-16")),
        ("NUL in a name", good.replace(b"model.layers.0.mlp.gate_proj", b"model.layers.0.mlp.gate_proj\\u0000", 1)),
    ]


def test_the_base_plan_has_every_section_and_applies(base, capsys):
    plan = base.plan
    assert plan["removal"]["removed"] and plan["sparse_tokens"]["filter_layer"] == 2
    assert plan["sharing"]["fit"] == "activation" and any(g["rank"] for g in plan["sharing"]["groups"])
    assert plan["quantization"]["method"] == "rtn" and plan["quantization"]["exact_weights"]
    tally = Tally("base plan")
    code, _ = apply_case(tally, capsys, base, "the base plan", dump(plan))
    assert code == 0 and not tally.failures, tally.failures


def test_fuzzed_plans_apply_or_give_one_clean_error(base, capsys):
    rng = random.Random(SEED)
    tally = Tally("plan fuzz")
    for i in range(250):
        plan = copy.deepcopy(base.plan)
        edits = [targeted_edit(plan, base, rng) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
        apply_case(tally, capsys, base, f"targeted {i}: {'; '.join(edits)}", dump(plan))
    for i in range(80):
        plan = copy.deepcopy(base.plan)
        edits = [generic_edit(plan, rng) for _ in range(rng.choice([1, 2]))]
        apply_case(tally, capsys, base, f"generic {i}: {'; '.join(edits)}", dump(plan))
    for label, content in hostile_plans(base):
        apply_case(tally, capsys, base, label, content)
    tally.report(capsys)
    assert tally.cases > 300 and tally.successes >= 30 and tally.errors >= 200


def set_path(plan: dict, path: tuple, value) -> dict:
    at(plan, path[:-1])[path[-1]] = value
    return plan


def first_shared(plan: dict) -> int:
    return next(i for i, g in enumerate(plan["sharing"]["groups"]) if g["rank"])


def a_linear(plan: dict, suffix: str = "mlp.up_proj") -> str:
    return next(n for n in plan["quantization"]["linears"] if n.endswith(suffix))


def removed_linear(plan: dict) -> str:
    layer = next(d["layer"] for d in plan["layers"] if d["mlp"] == "remove")
    return f"model.layers.{layer}.mlp.up_proj"


FINDINGS = [
    ("a linear without bits", lambda p: p["quantization"]["linears"][a_linear(p)].pop("bits"),
     "quantization.linears['model.layers.0.mlp.up_proj'] lacks ['bits']"),
    ("bits 7", lambda p: set_path(p, ("quantization", "linears", a_linear(p), "bits"), 7), "allowed: 2, 3, 4, 5, 6, 8"),
    ("bits 4.0", lambda p: set_path(p, ("quantization", "linears", a_linear(p), "bits"), 4.0), "is 4.0; allowed"),
    ("exact weight row outside", lambda p: set_path(p, ("quantization", "exact_weights", 0, "row"), 64),
     "quantization.exact_weights[0]: row 64, column 2 is outside"),
    ("exact weight row -1", lambda p: set_path(p, ("quantization", "exact_weights", 0, "row"), -1),
     "quantization.exact_weights[0].row is -1"),
    ("exact weight of no module", lambda p: set_path(p, ("quantization", "exact_weights", 0, "module"), "model.x"),
     "quantization.exact_weights[0].module is 'model.x'; allowed: one of the modules in quantization.linears"),
    ("rank above the full rank", lambda p: set_path(p, ("sharing", "groups", first_shared(p), "rank"), 1000),
     ".rank is 1000; allowed: 1..64"),
    ("unknown projection", lambda p: set_path(p, ("sharing", "groups", first_shared(p), "projection"), "x_proj"),
     ".projection is 'x_proj'; allowed:"),
    ("unknown fit", lambda p: set_path(p, ("sharing", "fit"), "magic"), "sharing.fit is 'magic'"),
    ("group layers of lists", lambda p: set_path(p, ("sharing", "groups", first_shared(p), "layers"), [[0]]),
     ".layers is [[0]]; allowed"),
    ("residual rank above the widths", lambda p: set_path(p, ("sharing", "groups", first_shared(p), "residual_rank"), 1000),
     ".residual_rank is 1000; allowed: 0..64"),
    ("no embedding", lambda p: p["quantization"].pop("embedding"), "quantization.embedding is None"),
    ("method awq", lambda p: set_path(p, ("quantization", "method"), "awq"), "quantization.method is 'awq'"),
    ("no damp", lambda p: p["quantization"].pop("damp"), "quantization.damp is None"),
    ("gptq without calibration", lambda p: (set_path(p, ("quantization", "method"), "gptq"),
                                            p["quantization"].pop("calibration")),
     "quantization.calibration is None"),
    ("calibration longer than the context", lambda p: set_path(p, ("sharing", "calibration", "seq_len"), 100_000),
     "sharing.calibration.seq_len is 100000; allowed: at most the model's context of 512 tokens"),
    ("filter layer as text", lambda p: set_path(p, ("sparse_tokens", "filter_layer"), "2"),
     "sparse_tokens.filter_layer '2' must be a layer whose attention the plan keeps"),
    ("model as text", lambda p: set_path(p, ("model",), "tiny"), "model is 'tiny'; allowed: an object"),
    ("a linear of a removed unit", lambda p: set_path(p, ("quantization", "linears", removed_linear(p)),
                                                      {"bits": 4, "group_size": 32, "symmetric": True}),
     "is 'remove', so this module does not exist"),
    ("group size not dividing the width", lambda p: set_path(p, ("quantization", "linears", a_linear(p), "group_size"), 128),
     "group_size is 128; allowed: 32, 64, null (input width 64)"),
    ("deep nesting in notes", lambda p: set_path(p, ("layers", 0, "notes"), json.loads("[" * 500 + "]" * 500)),
     "JSON nested more than 64 levels deep"),
]


@pytest.mark.parametrize("label, edit, expected", FINDINGS, ids=[f[0] for f in FINDINGS])
def test_each_plan_finding_is_one_clean_error_line(base, capsys, label, edit, expected):
    """The probe's findings, one by one: each was a traceback (KeyError, ValueError, IndexError,
    AttributeError, RuntimeError, RecursionError) or a plan applied while ignoring part of it."""
    plan = copy.deepcopy(base.plan)
    edit(plan)
    tally = Tally(label)
    code, line = apply_case(tally, capsys, base, label, dump(plan))
    assert not tally.failures, tally.failures
    assert code == 2 and expected in line, line
    assert line.startswith("compress: error: ") and "plan" in line.split(": ")[2]


@pytest.mark.parametrize("label, content, expected", [
    ("not JSON", b"layers: [keep]\n", "not valid JSON (line 1:"),
    ("empty", b"", "not valid JSON (line 1:"),
    ("a list", b"[1, 2]", "not a plan"),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, "JSON nested more than 64 levels deep"),
    ("huge", b'{"x": "' + b"p" * 17_000_000 + b'"}', "bytes a plan may have"),
    ("duplicate key", b'{"format": "compressor-plan/1", "format": "x"}', "repeats the key 'format'"),
    ("not UTF-8", b'{"format": "\xe9"}', "not UTF-8 text"),
])
def test_plan_files_that_are_not_plans(base, capsys, label, content, expected):
    tally = Tally(label)
    code, line = apply_case(tally, capsys, base, label, content)
    assert not tally.failures, tally.failures
    assert code == 2 and expected in line, line


# ---- analyses edited before `compress plan` -----------------------------------------------------

def analysis_edit(analysis: dict, original: dict, rng: random.Random) -> str:
    n = len(original["layers"])
    inventory = original["quantization"]
    sharing = original["sharing"]
    options = [
        (("layers", rng.randrange(n), "attention", "redundancy"), [0.5, -1, None, "x", math.nan, math.inf, [1]]),
        (("layers", rng.randrange(n), rng.choice(["attention", "mlp"])), [None, {}, "x", 1, []]),
        (("layers", rng.randrange(n), "layer"), [0, 5, -1, "0", None]),
        (("layers",), [[], None, {}, "x", [None]]),
        (("format",), ["compressor-plan/1", None, 3]),
        (("model",), [None, "x", []]),
        (("quantization", "linears", rng.randrange(len(inventory["linears"])), rng.choice(["name", "layer", "unit", "shape"])),
         [None, "x", -1, 99, [0, 64], [64], ["a", "b"], "attention", 1.5]),
        (("quantization", "linears"), [[], None, {}, [None]]),
        (("quantization", "embedding_shape"), [[512, 64], [512], None, [0, 64], "x"]),
        (("quantization", "other_tensor_bytes"), [0, -1, None, 1.5, 10**30]),
        (("quantization",), [None, [], "x", {}]),
        (("sharing", "groups", rng.randrange(len(sharing["groups"])), rng.choice(["cost", "layers", "projection"])),
         [[], [0.0], None, "x", [0, 99], [1, 0], "q_proj", "z_proj", [math.nan] * 200]),
        (("sharing", "projections", "q_proj", "shape"), [[64, 64], [64], None, [0, 0], "x"]),
        (("sharing", "other_tensor_bytes"), [0, -1, None]),
        (("sharing", "bytes_per_parameter"), [4, 0, 100, None]),
        (("sharing", "key"), [None, {}, "x"]),
        (("sharing",), [None, [], "x", {}]),
        (("super_weight_candidates",), [[], None, "x", [{}],
                                        [{"layer": 1, "row": 10**6, "column": 0, "weight": 1.0, "output_peak": 9.0}],
                                        [{"layer": 9, "row": 0, "column": 0, "weight": 1.0, "output_peak": 9.0}]]),
    ]
    path, pool = rng.choice(options)
    value = copy.deepcopy(rng.choice(pool))
    try:
        at(analysis, path[:-1])[path[-1]] = value
    except (KeyError, IndexError, TypeError):
        return "skipped"
    return ".".join(map(str, path)) + "=" + repr(value)[:30]


def test_fuzzed_analyses_give_a_plan_or_one_clean_error(base, capsys, tmp_path):
    rng = random.Random(SEED + 1)
    tally = Tally("analysis fuzz")
    original = json.loads(base.analysis.read_text())
    for i in range(80):
        analysis = copy.deepcopy(original)
        edits = [analysis_edit(analysis, original, rng) for _ in range(rng.choice([1, 1, 2]))]
        path = tmp_path / f"analysis{i}.json"
        path.write_text(json.dumps(analysis))
        tally.run(capsys, f"#{i} {'; '.join(edits)}", ["plan", "--recipe", base.recipe, "--analysis", path,
                                                       "--out", tmp_path / f"plan{i}.json"])
    path = tmp_path / "a-plan.json"
    path.write_text(json.dumps(base.plan))
    _, line = tally.run(capsys, "a plan given as the analysis", ["plan", "--recipe", base.recipe, "--analysis", path,
                                                                 "--out", tmp_path / "p.json"])
    assert "format is 'compressor-plan/1'; allowed: 'compressor-analysis/1'" in line
    tally.report(capsys)
    # Few edits leave a plannable analysis: one that drops a stage's record is an error now (the
    # stage is named), not a plan silently missing that section.
    assert tally.successes >= 1 and tally.errors >= 40
