"""`compressor.load` backends when the optional ONNX packages are missing: "auto" loads on torch and
answers like backend="torch"; "onnxruntime" is one error that names what to install.

The packages are made missing in a child interpreter (`sys.modules[name] = None` before anything is
imported: `import name` then fails and `importlib.util.find_spec(name)` answers None, as for a
package that is not installed), on an artifact that has an ONNX export, so "auto" would otherwise
pick onnxruntime.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import compressor
from compressor.pipeline import compress
from compressor.recipe import parse_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The history of the city begins"
NEW_TOKENS = 12

RECIPE = {"name": "backends", "calibration": {"samples": 2, "seq_len": 32},
          "remove": {"method": "similarity", "attention": 1, "mlp": 0, "protect": {"first": 0, "last": 0}},
          "evaluate": {"text": "embedded", "windows": 1, "seq_len": 32, "compare_original": False,
                       "speed": {"prompt_tokens": 8, "new_tokens": 2, "repeats": 1}},
          "export": ["safetensors", "onnx"]}

CHILD = textwrap.dedent("""
    import json, sys
    blocked = json.loads(sys.argv[2])
    for name in blocked:
        sys.modules[name] = None  # as if not installed: imports fail, find_spec answers None
    import compressor
    from compressor.errors import CompressorError

    auto = compressor.load(sys.argv[1], backend="auto")
    result = {"backend": auto.backend, "text": auto.generate(sys.argv[3], max_new_tokens=int(sys.argv[4])),
              "onnx_modules_imported": sorted(m for m in sys.modules if m.startswith("exporters.onnx.")
                                              and m != "exporters.onnx.files")}
    try:
        compressor.load(sys.argv[1], backend="onnxruntime")
        result["onnxruntime_error"] = None
    except CompressorError as exc:
        result["onnxruntime_error"] = str(exc)
    print(json.dumps(result))
""")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_model_folder) -> Path:
    out = tmp_path_factory.mktemp("backends") / "artifact"
    return compress(parse_recipe(RECIPE), str(tiny_model_folder["llama"]), out, quiet=True, log=lambda m: None)


def run_without(blocked: tuple[str, ...], folder: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", CHILD, str(folder), json.dumps(blocked), PROMPT, str(NEW_TOKENS)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("blocked, named", [(("onnx", "onnxruntime", "onnxscript"), ("onnx", "onnxruntime")),
                                            (("onnx",), ("onnx",))])
def test_auto_loads_on_torch_without_the_onnx_packages(artifact, blocked, named):
    assert (artifact / "onnx" / "model.onnx").is_file()
    assert compressor.load(artifact, backend="auto").backend == "onnxruntime"  # here, with the packages
    expected = compressor.load(artifact, backend="torch").generate(PROMPT, max_new_tokens=NEW_TOKENS)
    result = run_without(blocked, artifact)
    assert result["backend"] == "torch"
    assert result["text"] == expected and expected
    assert result["onnx_modules_imported"] == []  # auto chose torch without touching the ONNX code
    error = result["onnxruntime_error"]
    assert error is not None and error.startswith("backend 'onnxruntime' needs ")
    needed = error.split(" needs ", 1)[1].split(":", 1)[0]
    assert needed == ", ".join(named), error
    assert "pip install" in error
