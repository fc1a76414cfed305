"""Nothing lost: the destination is claimed before the work, published whole, with ordinary
permissions; concurrent runs, signals, full and read-only disks and dangerous --out values end in
one error line with nothing of anyone else's touched."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compressor import artifact as artifact_module
from compressor import cli, pipeline
from compressor.errors import CompressorError
from compressor.manifest import verify_manifest

from test_cli_errors import assert_nothing_written, write_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parent.parent


def run(capsys, *argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("compress: error: "), lines
    return lines[0]


def spawn(args: list, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "compressor.cli", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def llama(tiny_model_folder):
    return tiny_model_folder["llama"]


def _wait_for(condition, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_published_artifact_has_ordinary_permissions_and_a_manifest(tmp_path, llama, capsys):
    out = tmp_path / "art"
    old = os.umask(0o022)
    try:
        code, err = run(capsys, "--recipe", write_recipe(tmp_path), "--model", llama, "--out", out, "--quiet")
    finally:
        os.umask(old)
    assert code == 0, err
    assert out.stat().st_mode & 0o777 == 0o755
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert verify_manifest(out)["files"] >= 6
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no lock, no staging left


def test_relative_out_is_relative_to_the_callers_folder(tmp_path, llama):
    """The speed probe runs in another working folder: the default and relative --out still work."""
    recipe = write_recipe(tmp_path)
    done = spawn(["--recipe", recipe, "--model", llama, "--out", "rel/art", "--quiet"], cwd=tmp_path)
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    assert verify_manifest(tmp_path / "rel" / "art")["files"] >= 6
    assert f"artifact: {tmp_path / 'rel' / 'art'}" in out


def test_two_runs_on_one_destination_one_publishes_the_other_is_refused(tmp_path, llama):
    recipe = write_recipe(tmp_path)
    out = tmp_path / "shared"
    runs = [spawn(["--recipe", recipe, "--model", llama, "--out", out, "--quiet"], cwd=tmp_path) for _ in range(2)]
    results = [(r.wait(timeout=300), r.stderr.read()) for r in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "another compress run" in error_line(loser) or "output folder exists" in error_line(loser)
    verify_manifest(out)  # the winner's artifact, whole


def test_a_second_forced_run_cannot_replace_a_run_in_progress(tmp_path, llama):
    recipe = write_recipe(tmp_path)
    out = tmp_path / "busy"
    first = spawn(["--recipe", recipe, "--model", llama, "--out", out, "--quiet"], cwd=tmp_path)
    _wait_for(lambda: (tmp_path / ".busy.lock").exists() or first.poll() is not None)
    second = spawn(["--recipe", recipe, "--model", llama, "--out", out, "--force", "--quiet"], cwd=tmp_path)
    assert second.wait(timeout=300) == 2
    assert "another compress run" in error_line(second.stderr.read())
    assert first.wait(timeout=300) == 0
    verify_manifest(out)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_the_run_leaves_nothing_behind(tmp_path, llama, signum):
    recipe = write_recipe(tmp_path)
    out = tmp_path / "sig"
    run_ = spawn(["--recipe", recipe, "--model", llama, "--out", out, "--quiet"], cwd=tmp_path)
    _wait_for(lambda: any(p.name.startswith(".sig.partial-") for p in tmp_path.iterdir()) or run_.poll() is not None)
    run_.send_signal(signum)
    code = run_.wait(timeout=120)
    err = run_.stderr.read()
    assert code == 128 + signum, err
    assert "nothing was written" in err and "Traceback" not in err
    assert_nothing_written(out)
    assert not (tmp_path / ".sig.lock").exists()


def test_staging_left_by_a_killed_run_is_removed_by_the_next_claim(tmp_path, llama, capsys):
    (tmp_path / ".art.partial-dead1234").mkdir()
    (tmp_path / ".art.partial-dead1234" / "model.safetensors").write_bytes(b"0" * 1000)
    code, err = run(capsys, "--recipe", write_recipe(tmp_path), "--model", llama, "--out", tmp_path / "art", "--quiet")
    assert code == 0, err
    assert not (tmp_path / ".art.partial-dead1234").exists()


def test_force_replaces_only_an_artifact_folder(tmp_path, llama, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    code, err = run(capsys, "--recipe", write_recipe(tmp_path), "--model", llama, "--out", precious, "--force",
                    "--quiet")
    assert code == 2
    assert "holds files that are not an artifact" in error_line(err)
    assert (precious / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("out", [".", "..", "/", "~"])
def test_out_may_not_be_the_working_folder_or_above_it(tmp_path, llama, capsys, monkeypatch, out):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    (work / "keep.txt").write_text("x")
    # Looks like an artifact, so only the guard on the working folder (and above) can refuse it.
    (work / "manifest.json").write_text('{"format": "compressor-manifest/1", "files": {}}')
    code, err = run(capsys, "--recipe", write_recipe(tmp_path), "--model", llama, "--out",
                    os.path.expanduser(out), "--force", "--quiet")
    assert code == 2
    assert "choose a folder of its own" in error_line(err)
    assert (work / "keep.txt").read_text() == "x"


def test_too_little_free_space_is_refused_before_the_analysis(tmp_path, llama, capsys, monkeypatch):
    analyzed = []
    monkeypatch.setattr(artifact_module, "free_bytes", lambda folder: 1000)
    monkeypatch.setattr(pipeline, "run_stages", lambda *a, **k: analyzed.append(1))
    out = tmp_path / "full"
    code, err = run(capsys, "--recipe", write_recipe(tmp_path), "--model", llama, "--out", out, "--quiet")
    assert code == 2
    assert "MB free, but the smallest artifact this recipe can make needs about" in error_line(err)
    assert analyzed == []
    assert_nothing_written(out)


def _tmpfs(path: Path, options: str):
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({options}) here: needs root and mount rights")
    return path


@pytest.fixture
def small_disk(tmp_path):
    yield _tmpfs(tmp_path / "disk", "size=256k")
    subprocess.run(["umount", str(tmp_path / "disk")], check=False)


@pytest.fixture
def read_only_disk(tmp_path):
    yield _tmpfs(tmp_path / "ro", "size=1m,ro")
    subprocess.run(["umount", str(tmp_path / "ro")], check=False)


def test_a_disk_that_fills_up_while_writing_is_one_error_and_leaves_nothing(small_disk, tmp_path, llama, capsys,
                                                                             monkeypatch):
    monkeypatch.setattr(pipeline, "require_free_space", lambda *a, **k: None)  # let it reach the write
    out = small_disk / "art"
    code, err = run(capsys, "--recipe", write_recipe(tmp_path), "--model", llama, "--out", out, "--quiet")
    assert code == 2
    assert "no space left on the device" in error_line(err)
    assert list(small_disk.iterdir()) == []


def test_a_read_only_destination_is_refused_at_once(read_only_disk, tmp_path, llama, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("work started"))
    code, err = run(capsys, "--recipe", write_recipe(tmp_path), "--model", llama, "--out", read_only_disk / "art",
                    "--quiet")
    assert code == 2
    assert "read-only" in error_line(err)


def test_an_internal_error_is_one_line_and_the_traceback_is_on_request(tmp_path, llama, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise TypeError("a defect\nwith a second line")

    monkeypatch.setattr(pipeline, "compress", broken)
    code, err = run(capsys, "--recipe", write_recipe(tmp_path), "--model", llama, "--quiet")
    assert code == 1
    assert "internal error (TypeError: a defect)" in error_line(err)
    monkeypatch.setenv("COMPRESSOR_DEBUG", "1")
    with pytest.raises(TypeError):
        cli.main(["--recipe", str(write_recipe(tmp_path)), "--model", str(llama), "--quiet"])


def test_force_never_replaces_the_model_source_or_a_plain_model_folder(tmp_path, llama, capsys):
    source = Path(shutil.copytree(llama, tmp_path / "model"))
    before = sorted(p.name for p in source.iterdir())
    for out in (source, source / "inside"):
        code, err = run(capsys, "--recipe", write_recipe(tmp_path), "--model", source, "--out", out, "--force",
                        "--quiet")
        assert code == 2
        assert "overlaps the model source" in error_line(err) or "not an artifact" in error_line(err)
    other = Path(shutil.copytree(llama, tmp_path / "other-model"))
    code, err = run(capsys, "--recipe", write_recipe(tmp_path), "--model", llama, "--out", other, "--force", "--quiet")
    assert code == 2 and "not an artifact of this toolkit" in error_line(err)
    assert sorted(p.name for p in source.iterdir()) == before
    assert (other / "config.json").is_file()


def test_an_interrupt_between_the_two_renames_of_a_replace_keeps_the_old_artifact(tmp_path, llama, capsys,
                                                                               monkeypatch):
    out = tmp_path / "art"
    assert run(capsys, "--recipe", write_recipe(tmp_path), "--model", llama, "--out", out, "--quiet")[0] == 0
    old_manifest = (out / "manifest.json").read_text()
    real_replace, calls = os.replace, []

    def interrupted(src, dst):
        calls.append(dst)
        if Path(dst) == out and ".partial-" in str(src):  # staging -> dest, after dest was set aside
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(artifact_module.os, "replace", interrupted)
    code, err = run(capsys, "--recipe", write_recipe(tmp_path), "--model", llama, "--out", out, "--force", "--quiet")
    monkeypatch.undo()
    assert code == 130
    assert (out / "manifest.json").read_text() == old_manifest  # put back, not lost
    verify_manifest(out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".art.")] == []


def test_an_artifact_set_aside_by_a_killed_run_is_put_back_by_the_next_claim(tmp_path, llama, capsys):
    out = tmp_path / "art"
    assert run(capsys, "--recipe", write_recipe(tmp_path), "--model", llama, "--out", out, "--quiet")[0] == 0
    os.replace(out, tmp_path / ".art.old-4242")  # as if killed between the renames
    (tmp_path / ".art.partial-abcd1234").mkdir()
    live = tmp_path / ".art.partial-x.partial-abcd1234"  # another destination's staging: not ours
    live.mkdir()
    with pytest.raises(CompressorError, match="output folder exists"):
        with artifact_module.staged_folder(out, force=False):
            pytest.fail("the claim should see the artifact it put back")
    verify_manifest(out)  # back in place, whole
    assert live.is_dir() and not (tmp_path / ".art.partial-abcd1234").exists()
    assert not (tmp_path / ".art.old-4242").exists()


def test_analyze_claims_its_destination_too(tmp_path, llama, capsys):
    out = tmp_path / "analysis"
    code, err = run(capsys, "analyze", "--model", llama, "--out", out, "--samples", "1", "--seq-len", "16", "--quiet")
    assert code == 0, err
    assert verify_manifest(out)["files"] == 2
