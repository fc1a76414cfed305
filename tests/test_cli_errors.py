"""Bad input through the `compress` command: exit code 2, one `compress: error:` line, no partial output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from compressor import cli

TINY_RECIPE = """\
name: tiny
calibration: {text: embedded, samples: 2, seq_len: 32, seed: 0}
analysis: {batch_size: 2}
remove:
  method: similarity
  attention: ATTENTION
  protect: {first: 1, last: 1}
evaluate:
  text: embedded
  windows: 2
  seq_len: 64
  speed: {prompt_tokens: 16, new_tokens: 4, repeats: 1}
  compare_original: false
export: [safetensors]
"""


def write_recipe(folder: Path, text: str | None = None, attention: int = 1, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(text if text is not None else TINY_RECIPE.replace("ATTENTION", str(attention)))
    return path


def run_cli(capsys, argv):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, f"expected exactly one stderr line, got: {err!r}"
    assert lines[0].startswith("compress: error: ")
    return lines[0]


def assert_nothing_written(out: Path):
    assert not out.exists()
    if out.parent.exists():
        leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
        assert leftovers == []


@pytest.fixture
def llama(tiny_model_folder):
    return str(tiny_model_folder["llama"])


def test_missing_model_path(capsys, tmp_path):
    out = tmp_path / "out" / "artifact"
    code, stdout, err = run_cli(capsys, ["--recipe", write_recipe(tmp_path), "--model", "/nonexistent/dir",
                                         "--out", out, "--quiet"])
    assert code == 2
    line = assert_one_error_line(err)
    assert line == "compress: error: model path not found: /nonexistent/dir"
    assert stdout == ""
    assert_nothing_written(out)


def test_a_text_file_is_not_a_model(capsys, tmp_path):
    not_a_model = tmp_path / "weights.txt"
    not_a_model.write_text("hello\n")
    out = tmp_path / "artifact"
    code, stdout, err = run_cli(capsys, ["--recipe", write_recipe(tmp_path), "--model", not_a_model,
                                         "--out", out, "--quiet"])
    assert code == 2
    line = assert_one_error_line(err)
    assert line.startswith(f"compress: error: {not_a_model}: not a model; expected a folder with config.json")
    assert stdout == ""
    assert_nothing_written(out)


def test_a_folder_without_config_is_not_a_model(capsys, tmp_path):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    out = tmp_path / "artifact"
    code, _, err = run_cli(capsys, ["--recipe", write_recipe(tmp_path), "--model", folder, "--out", out, "--quiet"])
    assert code == 2
    assert assert_one_error_line(err) == \
        f"compress: error: {folder}: folder has no config.json; expected a transformers model folder"
    assert_nothing_written(out)


def test_malformed_yaml_recipe(capsys, tmp_path, llama):
    recipe = write_recipe(tmp_path, "name: broken\ncalibration:\n  samples: [2\nevaluate: {windows: 2}\n")
    out = tmp_path / "artifact"
    code, stdout, err = run_cli(capsys, ["--recipe", recipe, "--model", llama, "--out", out, "--quiet"])
    assert code == 2
    line = assert_one_error_line(err)
    assert line.startswith(f"compress: error: {recipe}: malformed YAML at line 4")
    assert stdout == ""
    assert_nothing_written(out)


def test_unknown_recipe_key(capsys, tmp_path, llama):
    recipe = write_recipe(tmp_path, TINY_RECIPE.replace("ATTENTION", "1").replace("method: similarity",
                                                                                  "methd: similarity"))
    out = tmp_path / "artifact"
    code, stdout, err = run_cli(capsys, ["--recipe", recipe, "--model", llama, "--out", out, "--quiet"])
    assert code == 2
    line = assert_one_error_line(err)
    assert line.startswith(f"compress: error: {recipe}: unknown key 'remove.methd'; allowed here: method, ")
    assert stdout == ""
    assert_nothing_written(out)


def test_removal_budget_larger_than_the_model(capsys, tmp_path, llama):
    # 6 layers, first and last protected: 4 attention units can go, not 7.
    recipe = write_recipe(tmp_path, attention=7)
    out = tmp_path / "artifact"
    code, stdout, err = run_cli(capsys, ["--recipe", recipe, "--model", llama, "--out", out, "--quiet"])
    assert code == 2
    line = assert_one_error_line(err)
    assert line == ("compress: error: remove.attention: budget of 7 units but only 4 attention units are removable "
                    "(6 layers, protect first 1 and last 1); allowed: 0..4")
    assert stdout == ""
    assert_nothing_written(out)


def test_existing_output_folder_without_force(capsys, tmp_path, llama):
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = sorted((str(p.relative_to(out)), p.stat().st_mtime_ns) for p in out.rglob("*"))
    code, stdout, err = run_cli(capsys, ["--recipe", write_recipe(tmp_path), "--model", llama, "--out", out, "--quiet"])
    assert code == 2
    line = assert_one_error_line(err)
    assert line == f"compress: error: output folder exists: {out} (pass --force to replace it)"
    assert stdout == ""
    assert sorted((str(p.relative_to(out)), p.stat().st_mtime_ns) for p in out.rglob("*")) == before
    assert (out / "keep.txt").read_text() == "precious"
    assert (out / "sub" / "data.bin").read_bytes() == b"\x00\x01"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".artifact.")] == []


def test_interrupted_run_leaves_nothing(capsys, tmp_path, llama, monkeypatch):
    from compressor import pipeline

    seen = {}

    def interrupted(model, tokenizer, settings, text, folder, quiet=False):
        seen["staging"] = Path(folder)
        seen["staging_existed"] = Path(folder).is_dir()
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "evaluate_model", interrupted)
    out = tmp_path / "runs" / "artifact"
    code, _, err = run_cli(capsys, ["--recipe", write_recipe(tmp_path), "--model", llama, "--out", out, "--quiet"])
    assert code == 130
    # The run did get as far as a staging folder beside the destination.
    assert seen["staging_existed"] is True
    assert seen["staging"].parent == out.parent
    assert seen["staging"].name.startswith(".artifact.partial-")
    assert not seen["staging"].exists()
    assert_nothing_written(out)
    assert list(out.parent.iterdir()) == []
    assert err.splitlines() == ["compress: interrupted; nothing was written at the destination"]


def test_error_while_staging_leaves_nothing(capsys, tmp_path, llama, monkeypatch):
    from compressor import pipeline
    from compressor.errors import CompressorError

    def failing(*args, **kwargs):
        raise CompressorError("evaluation text too short")

    monkeypatch.setattr(pipeline, "evaluate_model", failing)
    out = tmp_path / "artifact"
    code, _, err = run_cli(capsys, ["--recipe", write_recipe(tmp_path), "--model", llama, "--out", out, "--quiet"])
    assert code == 2
    assert assert_one_error_line(err) == "compress: error: evaluation text too short"
    assert_nothing_written(out)


def test_missing_recipe_in_a_subprocess(tmp_path):
    missing = tmp_path / "no-such-recipe.yaml"
    result = subprocess.run([sys.executable, "-m", "compressor.cli", "--recipe", str(missing)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"compress: error: recipe not found: {missing}"]
    assert not (tmp_path / "out").exists()


def test_analyze_rejects_invalid_overrides(capsys, tmp_path, llama):
    out = tmp_path / "analysis"
    code, stdout, err = run_cli(capsys, ["analyze", "--model", llama, "--out", out, "--samples", "0", "--quiet"])
    assert code == 2
    line = assert_one_error_line(err)
    assert line.startswith("compress: error: command line: calibration.samples:")
    assert "greater than or equal to 1" in line and "(got 0)" in line
    assert not out.exists()


def test_analyze_writes_table_heatmap_and_json(capsys, tmp_path, llama):
    out = tmp_path / "analysis"
    code, stdout, err = run_cli(capsys, ["analyze", "--model", llama, "--out", out, "--samples", "2",
                                         "--seq-len", "32", "--sensitivity", "--quiet"])
    assert code == 0, err
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["calibration"]["samples"] == 2 and analysis["calibration"]["seq_len"] == 32
    assert len(analysis["layers"]) == 6
    assert all(entry["attention"]["removal_js"] >= 0 for entry in analysis["layers"])
    assert (out / "analysis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table_rows = [line for line in stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [int(row.split()[0]) for row in table_rows] == list(range(6))
