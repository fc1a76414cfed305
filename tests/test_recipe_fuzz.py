"""Fuzzing recipes through the real command line, `compress plan --recipe R --analysis A --out P`.

Seeded mutations of the shipped recipes and of a tiny recipe (keys deleted, values replaced by
wrong types, absurd, negative or non-finite numbers, unknown keys, bad names), mutations of the
file's bytes (truncated, not UTF-8, stray YAML syntax) and hand-made hostile files (deep nesting,
alias bombs, huge files). For every case: exit status 0 or 2; on 2 exactly one stderr line
starting `compress: error: `, shorter than LINE_LIMIT; never a traceback (COMPRESSOR_DEBUG=1 lets
a defect raise instead of printing "internal error"); never past CASE_SECONDS. The analysis is made
once, by `compress analyze` on the tiny Llama folder.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import signal
import time
from pathlib import Path

import pytest
import yaml

from compressor import cli

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))
CASE_SECONDS = 20
LINE_LIMIT = 400
SEED = 20260

# Matches the tiny Llama of conftest (6 layers, widths 64/128): every section of a plan is made.
FUZZ_RECIPE = """\
name: fuzz
description: every section, on the tiny model
calibration: {text: embedded, samples: 2, seq_len: 32, seed: 0}
analysis: {batch_size: 2}
remove:
  method: similarity
  attention: 1
  mlp: 1
  protect: {first: 1, last: 1}
quantize:
  method: rtn
  bits: [4, 8]
  group_size: 32
  budget: {avg_bits: 6.0}
  allocate: uniform
  embeddings: 8
share:
  projections: [q_proj, k_proj]
  reduction: 0.1
  fit: weight
  grouping: adjacent
  group_size: 2
  rank_multiple: 16
sparse_tokens: {method: promptdistill, filter_layer: 2, keep_tokens: 64, keep_first: 1, keep_last: 8,
                probe: {tokens: 128}}
evaluate:
  text: embedded
  windows: 2
  seq_len: 64
  speed: {prompt_tokens: 16, new_tokens: 4, repeats: 1}
  compare_original: false
export: [safetensors]
"""


# ---- running one case ---------------------------------------------------------------------------

class Hang(BaseException):
    """Raised by the alarm: a case ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def expired(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Tally:
    """Counts of a fuzz run, and what went wrong (with the case that did it)."""

    def __init__(self, name: str):
        self.name = name
        self.cases = self.errors = self.successes = self.tracebacks = self.hangs = 0
        self.failures: list[str] = []
        self.lines: list[str] = []  # every case and its outcome (printed with COMPRESSOR_FUZZ_SHOW=1)
        self.slowest = (0.0, "")
        self.started = time.perf_counter()

    def run(self, capsys, label: str, argv: list, seconds: float = CASE_SECONDS) -> tuple[int | None, str]:
        """Runs `compress ARGV` in this process; returns (exit status or None, the error line)."""
        capsys.readouterr()
        self.cases += 1
        started = time.perf_counter()
        code, line = None, ""
        try:
            with time_limit(seconds):
                code = cli.main([str(a) for a in argv])
        except Hang:
            self.hangs += 1
            self.failures.append(f"{label}: hang (over {seconds} s)")
        except BaseException as exc:  # a traceback the user would see
            self.tracebacks += 1
            self.failures.append(f"{label}: traceback {type(exc).__name__}: {str(exc)[:200]}")
        elapsed = time.perf_counter() - started
        self.slowest = max(self.slowest, (elapsed, label))
        out, err = capsys.readouterr()
        if code is None:
            return None, ""
        if "Traceback" in err or "Traceback" in out:
            self.tracebacks += 1
            self.failures.append(f"{label}: a traceback was printed")
        if code == 1 and "internal error" in err:
            self.tracebacks += 1
            self.failures.append(f"{label}: {err.strip()[:300]}")
        elif code == 0:
            self.successes += 1
        elif code == 2:
            lines = err.splitlines()
            if len(lines) != 1 or not lines[0].startswith("compress: error: ") or len(lines[0]) >= LINE_LIMIT:
                self.failures.append(f"{label}: not one short error line: {err[:300]!r} ({len(err)} chars)")
            else:
                self.errors += 1
                line = lines[0]
        else:
            self.failures.append(f"{label}: exit status {code}: {err[:200]!r}")
        self.lines.append(f"{label} -> {code}: {line or err.strip()[:120]}")
        return code, line

    def summary(self) -> str:
        return (f"{self.name}: {self.cases} cases, {self.errors} clean errors, {self.successes} successes, "
                f"{self.tracebacks} tracebacks, {self.hangs} hangs, {len(self.failures)} failures, "
                f"{time.perf_counter() - self.started:.1f} s (slowest case {self.slowest[0]:.2f} s: {self.slowest[1]})")

    def report(self, capsys) -> None:
        with capsys.disabled():
            if os.environ.get("COMPRESSOR_FUZZ_SHOW"):
                print("\n" + "\n".join(self.lines))
            print("\n" + self.summary())
        assert not self.failures, self.summary() + "\n" + "\n".join(self.failures[:15])


# ---- mutations ----------------------------------------------------------------------------------

def deep(levels: int):
    value = {"x": 1}
    for _ in range(levels):
        value = {"x": value}
    return value


NASTY = [None, True, False, 0, 1, 2, 3, -1, -7, 7, 8, 64, 100, 4096, 2**31, 2**63, 10**30, -10**30, 1e308, -1e308,
         float("inf"), float("-inf"), float("nan"), 0.5, 0.999, 1.5, 1e-300, "", "x", "auto", "keep", "channel",
         "embedded", "../../elsewhere", "/an/absolute/path", "a" * 3000, "tab\there", "nul\x00byte", "12", "1e999",
         [], [1, 2, 3], [4, 4], ["q_proj", "q_proj"], list(range(300)), [[1]], {}, {"x": 1}, {"avg_bits": 4},
         {"bytes": 1}, deep(40), {"a": {"b": {"c": [1, {"d": None}]}}}]
BAD_NAMES = ["/some/folder", "..", ".", "", "a/b", "a\\b", ".hidden", "-dash", "x" * 101, "spa ce", "new\nline",
             "nul\x00", "ünïcode", 7, None, ["x"], "ok-name_1.2", "R"]
UNKNOWN_KEYS = ["colour", "methd", "Name", "name ", "1", "remove", "<<", "bits", 1, None, True, "x" * 500]


def all_paths(data, prefix=()):
    yield prefix
    if isinstance(data, dict):
        for key, value in data.items():
            yield from all_paths(value, prefix + (key,))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from all_paths(value, prefix + (index,))


def at(data, path):
    for part in path:
        data = data[part]
    return data


def mutate_data(data, rng: random.Random):
    """One random edit of `data` in place: delete, replace, swap, add an unknown key, or rename."""
    paths = [p for p in all_paths(data) if p]
    kind = rng.choice(["delete", "replace", "replace", "replace", "swap", "unknown", "name"])
    if kind == "name" and isinstance(data, dict):
        data["name"] = rng.choice(BAD_NAMES)
        return kind
    if not paths:
        return "none"
    path = rng.choice(paths)
    parent, last = at(data, path[:-1]), path[-1]
    if kind == "delete":
        del parent[last]
    elif kind == "replace":
        parent[last] = copy.deepcopy(rng.choice(NASTY))
    elif kind == "swap":
        parent[last] = copy.deepcopy(at(data, rng.choice(paths)))
    else:
        target = at(data, path) if isinstance(at(data, path), dict) else data
        target[rng.choice(UNKNOWN_KEYS)] = copy.deepcopy(rng.choice(NASTY))
    return kind


def mutate_text(text: str, rng: random.Random) -> bytes:
    """One random edit of a file's text, as bytes (some are not UTF-8)."""
    raw = text.encode()
    kind = rng.choice(["truncate", "bytes", "syntax", "duplicate", "crlf", "bom", "indent"])
    at_ = rng.randrange(len(raw) + 1)
    if kind == "truncate":
        return raw[:at_]
    if kind == "bytes":
        return raw[:at_] + rng.choice([b"\xff\xfe", b"\xc3\x28", b"\x80", b"\xe9t\xe9", b"\x00", b"\x1b[31m"]) + raw[at_:]
    if kind == "syntax":
        return raw[:at_] + rng.choice(list(b":{}[]&*!|>-#%@`\"'\t\n?,")).to_bytes(1, "big") + raw[at_:]
    lines = text.splitlines(keepends=True)
    if kind == "duplicate" and lines:
        i = rng.randrange(len(lines))
        return "".join(lines[: i + 1] + [lines[i]] + lines[i + 1:]).encode()
    if kind == "crlf":
        return text.replace("\n", "\r\n").encode()
    if kind == "bom":
        return b"\xef\xbb\xbf" + raw
    i = rng.randrange(len(lines)) if lines else 0
    return "".join(lines[:i] + [" " + line for line in lines[i:i + 1]] + lines[i + 1:]).encode()


def alias_bomb(levels: int = 9, anchor_name: str = "l") -> str:
    """A YAML 'billion laughs': 9 levels of 9 references each (9^9 strings once expanded)."""
    lines = [f'{anchor_name}0: &{anchor_name}0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        refs = ", ".join([f"*{anchor_name}{i - 1}"] * 9)
        lines.append(f"{anchor_name}{i}: &{anchor_name}{i} [{refs}]")
    return "\n".join(lines) + "\n"


def hostile_files() -> list[tuple[str, bytes]]:
    bomb = alias_bomb()
    return [
        ("empty", b""),
        ("only a comment", b"# nothing\n"),
        ("document marker", b"---\n"),
        ("null", b"null\n"),
        ("a list", b"- name\n- x\n"),
        ("a number", b"42\n"),
        ("a string", b"'just text'\n"),
        ("two documents", b"name: a\n---\nname: b\n"),
        ("deep flow nesting", b"name: x\ndescription: " + b"[" * 20000 + b"]" * 20000 + b"\n"),
        ("deep block nesting", "".join(" " * i + f"k{i}:\n" for i in range(300)).encode()),
        ("alias bomb in calibration.samples", (bomb + "calibration: {samples: *l8}\n").encode()),
        ("alias bomb in description", (bomb + "description: *l8\n").encode()),
        ("alias bomb in protect.layers", (bomb + "quantize: {protect: {layers: *l8}}\n").encode()),
        ("alias bomb as name", (bomb + "name: *l8\n").encode()),
        ("alias bomb as an unknown key", (bomb + "extra: *l8\n").encode()),
        ("recursive alias", b"calibration: &a {samples: *a}\n"),
        ("recursive list alias", b"export: &e [*e]\n"),
        ("too large (300 kB)", b"name: big\ndescription: '" + b"x" * 300_000 + b"'\n"),
        ("huge (50 MB)", b"name: huge\n# " + b"y" * 50_000_000 + b"\n"),
        ("just under the size limit, 120k values", b"quantize: {protect: {layers: [" + b"0," * 120_000 + b"0]}}\n"),
        ("a 200 kB name", b"name: " + b"n" * 200_000 + b"\n"),
        ("a 200 kB unknown key", b"k" * 200_000 + b": 1\n"),
        ("python object tag", b"name: !!python/object/apply:os.system ['true']\n"),
        ("binary tag", b"name: !!binary aGVsbG8=\n"),
        ("set tag", b"export: !!set {safetensors, onnx}\n"),
        ("bad timestamp", b"name: 2001-13-45\n"),
        ("timestamp", b"description: 2001-12-14\n"),
        ("integer of 5000 digits", b"calibration: {samples: " + b"9" * 5000 + b"}\n"),
        ("merge keys", b"base: &b {samples: 2}\ncalibration: {<<: *b, seq_len: 32}\n"),
        ("merge of a list", b"calibration: {<<: [1, 2]}\n"),
        ("duplicate keys", b"name: a\nname: b\n"),
        ("latin-1 text", "name: caf\xe9\n".encode("latin-1")),
        ("UTF-16 with BOM", "name: x\n".encode("utf-16")),
        ("NUL byte", b"name: a\x00b\n"),
        ("tab indentation", b"remove:\n\tattention: 1\n"),
        ("avg_bits .inf", b"quantize: {budget: {avg_bits: .inf}, allocate: uniform, method: rtn}\n"),
        ("avg_bits .nan", b"quantize: {budget: {avg_bits: .nan}, allocate: uniform, method: rtn}\n"),
        ("avg_bits 1e308", b"quantize: {budget: {avg_bits: 1e308}, allocate: uniform, method: rtn}\n"),
        ("bytes 1e30", b"quantize: {budget: {bytes: 1000000000000000000000000000000}, allocate: uniform}\n"),
        ("remove .inf", b"remove: {attention: .inf}\n"),
        ("remove 1e300", b"remove: {any: 1e300}\n"),
        ("damp .nan", b"quantize: {damp: .nan}\n"),
        ("reduction .nan", b"share: {reduction: .nan}\n"),
        ("min_recall .inf", b"sparse_tokens: {probe: {min_recall: .inf}}\n"),
        ("samples 10^12", b"calibration: {samples: 1000000000000}\n"),
        ("seed 2^70", b"calibration: {seed: 1180591620717411303424}\n"),
        ("long error line", b"calibration: {text: [" + b"'aaaaaaaaaa'," * 20_000 + b"'a']}\n"),
        ("name /some/folder", b"name: /some/folder\n"),
        ("name ..", b"name: ..\n"),
        ("name .", b"name: .\n"),
        ("empty name", b"name: ''\n"),
    ]


@pytest.fixture(autouse=True)
def defects_raise(monkeypatch):
    """A defect raises (and is counted as a traceback) instead of becoming an 'internal error' line."""
    monkeypatch.setenv("COMPRESSOR_DEBUG", "1")


# ---- the analysis, once -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def analysis(tmp_path_factory, tiny_model_folder, one_torch_thread):
    folder = tmp_path_factory.mktemp("recipe-fuzz")
    recipe = folder / "fuzz.yaml"
    recipe.write_text(FUZZ_RECIPE)
    out = folder / "analysis"
    code = cli.main(["analyze", "--model", str(tiny_model_folder["llama"]), "--recipe", str(recipe),
                     "--out", str(out), "--quiet"])
    assert code == 0
    return out / "analysis.json"


def test_the_tiny_recipe_plans_every_section(analysis, tmp_path, capsys):
    import json

    recipe = tmp_path / "fuzz.yaml"
    recipe.write_text(FUZZ_RECIPE)
    assert cli.main(["plan", "--recipe", str(recipe), "--analysis", str(analysis), "--out", str(tmp_path / "p.json")]) == 0
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["removal"]["removed"] and plan["sparse_tokens"]["filter_layer"] == 2
    assert any(g["rank"] for g in plan["sharing"]["groups"]) and plan["quantization"]["linears"]


def test_fuzzed_recipes_give_a_plan_or_one_clean_error(analysis, tmp_path, capsys):
    rng = random.Random(SEED)
    tally = Tally("recipe fuzz")
    bases = [("tiny", FUZZ_RECIPE)] + [(p.name, p.read_text()) for p in RECIPES]
    number = 0

    def case(label: str, content: bytes):
        nonlocal number
        number += 1
        path = tmp_path / f"case{number}.yaml"
        path.write_bytes(content)
        tally.run(capsys, f"#{number} {label}",
                  ["plan", "--recipe", path, "--analysis", analysis, "--out", tmp_path / f"plan{number}.json"])
        path.unlink()

    for name, text in bases:
        data = yaml.safe_load(text)
        mutations = 30 if name == "tiny" else 24
        for i in range(mutations):
            mutated = copy.deepcopy(data)
            kinds = [mutate_data(mutated, rng) for _ in range(rng.choice([1, 1, 2, 3]))]
            case(f"{name} data {i} ({'+'.join(kinds)})", yaml.safe_dump(mutated, sort_keys=False).encode())
        for i in range(8):
            case(f"{name} text {i}", mutate_text(text, rng))
    for label, content in hostile_files():
        case(label, content)
    tally.report(capsys)
    assert tally.cases > 300 and tally.successes > 5 and tally.errors > 200


@pytest.mark.parametrize("label, content, expected", [
    ("name /some/folder", b"name: /some/folder\n", "name: '/some/folder' is not a recipe name"),
    ("name ..", b"name: ..\n", "name: '..' is not a recipe name"),
    ("name .", b"name: .\n", "name: '.' is not a recipe name"),
    ("empty name", b"name: ''\n", "name: '' is not a recipe name"),
    ("latin-1", "name: caf\xe9\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 9)"),
    ("deep nesting", b"description: " + b"[" * 20000 + b"]" * 20000 + b"\n", "nested more than 32 levels deep"),
    ("alias bomb", (alias_bomb() + "calibration: {samples: *l8}\n").encode(), "more than 50000 values"),
    ("huge", b"name: huge\n# " + b"y" * 50_000_000 + b"\n", "bytes a recipe may have"),
    ("avg_bits .inf", b"quantize: {budget: {avg_bits: .inf}, allocate: uniform, method: rtn}\n",
     "quantize.budget.avg_bits: input should be a finite number"),
    ("long value", b"calibration: {text: [" + b"'aaaaaaaaaa'," * 20_000 + b"'a']}\n", "calibration.text"),
])
def test_each_finding_is_one_clean_error_line(analysis, tmp_path, capsys, label, content, expected):
    """The findings of the probe, one by one: each was a traceback, a hang, a line of megabytes or a
    recipe accepted with a name that points outside out/."""
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    started = time.perf_counter()
    with time_limit(CASE_SECONDS):
        code = cli.main(["plan", "--recipe", str(path), "--analysis", str(analysis), "--out", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert code == 2, label
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"compress: error: {path}: "), err[:500]
    assert expected in lines[0] and len(lines[0]) < LINE_LIMIT, lines[0]
    assert time.perf_counter() - started < 5
    assert not (tmp_path / "p.json").exists()
