"""llama.cpp as a measured peer of the quantization bench, on the embedded model (SmolLM2-135M-Instruct).

llama.cpp is taken from the `llama-cpp-python` source distribution (it vendors llama.cpp under
vendor/llama.cpp), so the command-line tools and the Python bindings are the same llama.cpp. The
steps are plain functions, imported by bench/quantization.py:

- build_tools: the sdist, a CPU Release build of llama-quantize / llama-imatrix / llama-bench, and the
  bindings installed from the same sdist; all cached, a second run builds nothing;
- convert: a transformers folder to an f32 GGUF with the vendored convert_hf_to_gguf.py;
- imatrix: llama-imatrix on the embedded text (calibration is never the evaluation text);
- quantize: llama-quantize to Q8_0, Q4_K_M, Q4_0, Q3_K_M, Q2_K, IQ4_XS;
- score: WikiText-2 perplexity from the bindings' logits on the toolkit's own token windows, scored
  exactly as compressor.evaluate.perplexity scores them (not llama-perplexity, which scores only the
  second half of each window and tokenizes the text itself);
- decode_speed: prefill and greedy-decode speed through the bindings (llama-bench as a cross-check);
- file_bytes / bits_per_weight.

    python -m bench.llamacpp                 # everything; writes bench/results/llamacpp.{json,md}
    python -m bench.llamacpp --types Q8_0    # a subset of the types
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

# The llama-cpp-python release whose vendored llama.cpp is measured; pinned so that a rerun measures
# the same llama.cpp and finds its cache.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
TOOLS = ("llama-quantize", "llama-imatrix", "llama-bench")
# The bindings' CMakeLists needs 3.21; llama.cpp itself 3.14.
CMAKE_MINIMUM = (3, 21)
BUILD_JOBS = 2
THREADS = 2

# Type -> whether the importance matrix is passed. Q2_K and IQ4_XS lose much more without one
# (llama-quantize warns for Q2_K); the others are measured as llama.cpp quantizes them by default.
QUANT_TYPES = {"Q8_0": False, "Q4_K_M": False, "Q4_0": False, "Q3_K_M": False, "Q2_K": True, "IQ4_XS": True}
CONTEXT = 512
FLOAT_TOLERANCE = 0.05  # how far the f32 GGUF may score from the toolkit's float model
QUIET_CORES = 0.1  # below this many cores kept busy by other processes, the machine counts as quiet


class StepError(RuntimeError):
    """One step failed; the message is one line saying which and what to do."""


def default_cache(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    return Path.home() / ".cache" / "compressor-bench" / f"llama.cpp-{version}"


def log(message: str) -> None:
    print(f"[llamacpp] {message}", file=sys.stderr, flush=True)


def run_step(step: str, command: list, log_file: Path, env: dict | None = None, cwd: Path | None = None,
             hint: str = "", stdout_only: bool = False) -> str:
    """Runs a command with its output in `log_file` (the tools are verbose); a failure raises one line
    naming the step, the last output line and `hint`. Returns the output (stdout alone with
    `stdout_only`, for a tool that prints its result there and its log on stderr)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as out:
        try:
            done = subprocess.run([str(c) for c in command], stdout=subprocess.PIPE if stdout_only else out,
                                  stderr=out if stdout_only else subprocess.STDOUT, env=env, cwd=cwd, text=True)
        except OSError as exc:
            raise StepError(f"{step}: could not start {command[0]} ({exc}){'; ' + hint if hint else ''}") from None
    text = log_file.read_text(errors="replace")
    if done.returncode != 0:
        last = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "no output")
        raise StepError(f"{step} failed (exit {done.returncode}): {last[:300]} (full log: {log_file})"
                        f"{'; ' + hint if hint else ''}")
    return done.stdout if stdout_only else text


# ----------------------------------------------------------------------------------------- build


def _pip(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", *args]


def fetch_sdist(cache: Path, version: str) -> Path:
    """The llama-cpp-python sdist, extracted under `cache/src` (downloaded once)."""
    source = cache / "src" / f"llama_cpp_python-{version}"
    if (source / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        return source
    downloads = cache / "sdist"
    found = sorted(downloads.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not found:
        log(f"downloading the llama-cpp-python {version} source distribution")
        run_step("downloading the llama-cpp-python sdist",
                 _pip("download", "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={version}",
                      "-d", str(downloads)),
                 cache / "logs" / "download.log", hint="pip must reach the package index")
        found = sorted(downloads.glob(f"llama_cpp_python-{version}.tar.gz"))
        if not found:
            raise StepError(f"downloading the llama-cpp-python sdist: no llama_cpp_python-{version}.tar.gz "
                            f"in {downloads}")
    staging = cache / "src" / ".extracting"
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(found[0]) as archive:
        # The "data" filter (no absolute paths, links out, devices) where this Python has it.
        archive.extractall(staging, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    os.replace(staging / source.name, source)
    shutil.rmtree(staging, ignore_errors=True)
    return source


def _cmake_version(cmake: str) -> tuple[int, ...] | None:
    try:
        text = subprocess.run([cmake, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return None
    match = re.search(r"version (\d+)\.(\d+)", text)
    return tuple(int(x) for x in match.groups()) if match else None


def find_cmake(cache: Path) -> str:
    """A cmake of at least CMAKE_MINIMUM: the one on PATH or in this environment, else cmake from the
    package index installed into this environment."""
    candidates = [shutil.which("cmake"), str(Path(sys.executable).parent / "cmake")]
    for cmake in candidates:
        if cmake and Path(cmake).is_file() and (_cmake_version(cmake) or (0,)) >= CMAKE_MINIMUM:
            return cmake
    log("no cmake >= %d.%d found; installing cmake into this environment" % CMAKE_MINIMUM)
    run_step("installing cmake", _pip("install", "cmake"), cache / "logs" / "pip-cmake.log",
             hint="install cmake >= 3.21 (pip install cmake, or the system package)")
    cmake = str(Path(sys.executable).parent / "cmake")
    if (_cmake_version(cmake) or (0,)) < CMAKE_MINIMUM:
        raise StepError(f"installing cmake: {cmake} is missing or older than 3.21; install cmake >= 3.21")
    return cmake


def _check_compiler() -> None:
    found = [any(shutil.which(c) for c in names) for names in (("c++", "g++", "clang++"), ("cc", "gcc", "clang"))]
    if not all(found):
        raise StepError("building llama.cpp: no C/C++ compiler found; install one "
                        "(Debian: apt-get install build-essential)")


def compiler_flags() -> str:
    """Extra C/C++ flags of both builds. On x86-64 the AMX kernels are compiled out: with them, a
    native build on an AMX machine crashes in ggml_backend_amx_mul_mat (ldtilecfg) on the first batch
    of more than one token of any quantized model (seen here in llama-bench and the bindings alike;
    llama.cpp issue 20824, closed unfixed). Everything else stays -march=native."""
    return "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" if platform.machine().lower() in ("x86_64", "amd64") else ""


def _with_flags(env: dict) -> dict:
    flags = compiler_flags()
    env = dict(env)
    for name in ("CFLAGS", "CXXFLAGS"):
        env[name] = f"{env.get(name, '')} {flags}".strip()
    return env


def build_binaries(source: Path, cache: Path, cmake: str) -> dict:
    """CPU-only Release build of the three tools, statically linked so that they need nothing from
    the build folder; only those targets, BUILD_JOBS jobs. A build made with other settings is
    redone (its settings are stamped in the build folder)."""
    build = cache / "build"
    paths = {tool: build / "bin" / tool for tool in TOOLS}
    settings = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF",
                "-DGGML_VULKAN=OFF", "-DGGML_BLAS=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
                "-DLLAMA_BUILD_TOOLS=ON", f"compiler flags: {compiler_flags()}"]
    stamp = build / "compressor-bench-settings.json"
    if all(p.is_file() for p in paths.values()) and stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return {"paths": paths, "seconds": None}
    _check_compiler()
    shutil.rmtree(build, ignore_errors=True)
    started = time.perf_counter()
    log(f"configuring llama.cpp (cmake, Release, CPU only) in {build}")
    run_step("configuring llama.cpp with cmake",
             [cmake, "-S", source / "vendor" / "llama.cpp", "-B", build, *settings[:-1]],
             cache / "logs" / "cmake-configure.log", env=_with_flags(os.environ),
             hint="install a C/C++ compiler and cmake >= 3.21")
    log(f"building {', '.join(TOOLS)} with {BUILD_JOBS} jobs (several minutes)")
    run_step("building the llama.cpp tools",
             [cmake, "--build", build, "--config", "Release", "-j", str(BUILD_JOBS), "--target", *TOOLS],
             cache / "logs" / "cmake-build.log", hint="see the log; a C++17 compiler is needed")
    missing = [tool for tool, p in paths.items() if not p.is_file()]
    if missing:
        raise StepError(f"building the llama.cpp tools: {', '.join(missing)} not found under {build / 'bin'}")
    stamp.write_text(json.dumps(settings))
    return {"paths": paths, "seconds": time.perf_counter() - started}


def _probe_bindings() -> dict | None:
    """The importable llama_cpp's version and llama.cpp system info, read in a child process (a
    library loaded here could not be replaced by a reinstall); None when it does not import."""
    code = ("import llama_cpp, json; "
            "print(json.dumps([llama_cpp.__version__, llama_cpp.llama_print_system_info().decode()]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        return None
    version, system_info = json.loads(done.stdout.strip().splitlines()[-1])
    return {"version": version, "system_info": system_info}


def _crashing_build(probe: dict) -> bool:
    # Bindings built with the AMX kernels (see compiler_flags) crash on this kind of machine.
    return bool(compiler_flags()) and "AMX_INT8 = 1" in probe["system_info"]


def install_bindings(sdist_source: Path, cache: Path, version: str) -> dict:
    """The llama_cpp bindings: the installed ones when `import llama_cpp` works (and they are not an
    AMX build, which crashes), else compiled from the same sdist and installed. The wheel pip
    compiles is kept in `cache/wheels`, so a new environment installs it without compiling again."""
    probe = _probe_bindings()
    if probe is not None and not _crashing_build(probe):
        return {"version": probe["version"], "system_info": probe["system_info"], "seconds": None, "installed": False}
    if probe is not None:
        log(f"the installed llama_cpp {probe['version']} is built with the AMX kernels, which crash here; replacing it")
    wheels = cache / "wheels" / ("no-amx" if compiler_flags() else "default")
    wheel = sorted(wheels.glob(f"llama_cpp_python-{version}-*.whl"))
    started, compiled = time.perf_counter(), False
    if not wheel:
        env = _with_flags(dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=str(BUILD_JOBS)))
        # CPU only; the multimodal library (mtmd) is not needed to score text and doubles the compile.
        env["CMAKE_ARGS"] = " ".join([env.get("CMAKE_ARGS", ""), "-DLLAVA_BUILD=OFF", "-DGGML_CUDA=OFF",
                                      "-DGGML_VULKAN=OFF", "-DGGML_BLAS=OFF"]).strip()
        log(f"compiling the llama-cpp-python {version} bindings from the sdist (several minutes)")
        run_step("compiling the llama-cpp-python bindings",
                 _pip("wheel", "--no-deps", "--no-cache-dir", "-w", str(wheels), str(sdist_source)),
                 cache / "logs" / "pip-wheel.log", env=env,
                 hint="a C/C++ compiler and cmake >= 3.21 are needed; pip fetches scikit-build-core")
        wheel = sorted(wheels.glob(f"llama_cpp_python-{version}-*.whl"))
        if not wheel:
            raise StepError(f"compiling the llama-cpp-python bindings: no wheel in {wheels}")
        compiled = True
    log(f"installing {wheel[-1].name} into this environment")
    # Replacing: only the package itself (its requirements are there already).
    replace = ["--force-reinstall", "--no-deps"] if probe is not None else []
    run_step("installing the llama-cpp-python bindings", _pip("install", *replace, str(wheel[-1])),
             cache / "logs" / "pip-install.log", hint=f"pip install {wheel[-1]}")
    probe = _probe_bindings()
    if probe is None:
        raise StepError("importing llama_cpp after installing it failed; see "
                        f"{cache / 'logs' / 'pip-install.log'}")
    if _crashing_build(probe):
        raise StepError("the installed llama_cpp still has the AMX kernels; pip uninstall llama-cpp-python and rerun")
    importlib.invalidate_caches()
    return {"version": probe["version"], "system_info": probe["system_info"],
            "seconds": time.perf_counter() - started, "installed": True, "compiled": compiled}


def _llama_commit(llama_source: Path) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(llama_source), "rev-parse", "HEAD"], capture_output=True, text=True)
    except OSError:
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def build_tools(cache: Path | None = None, version: str = LLAMA_CPP_PYTHON_VERSION) -> dict:
    """Everything the other steps need, under `cache` (default ~/.cache/compressor-bench/llama.cpp-VERSION):
    paths of the three tools, the vendored convert_hf_to_gguf.py and gguf-py, the bindings' version,
    the vendored llama.cpp commit, and how long building took (None: cached)."""
    cache = Path(cache or default_cache(version))
    cache.mkdir(parents=True, exist_ok=True)
    source = fetch_sdist(cache, version)
    llama_source = source / "vendor" / "llama.cpp"
    binaries = build_binaries(source, cache, find_cmake(cache))
    bindings = install_bindings(source, cache, version)
    if bindings["version"] != version:
        log(f"note: llama_cpp {bindings['version']} is installed, the tools are llama.cpp from {version}")
    return {
        "version": version, "cache": str(cache), "llama_cpp_commit": _llama_commit(llama_source),
        **{tool: str(path) for tool, path in binaries["paths"].items()},
        "convert_script": str(llama_source / "convert_hf_to_gguf.py"), "gguf_py": str(llama_source / "gguf-py"),
        "tools_build_seconds": binaries["seconds"], "bindings": bindings,
    }


# ------------------------------------------------------------------------------------- the model


def float_folder(out: Path) -> Path:
    """The embedded model as a plain transformers Llama folder (config.json, model.safetensors, the
    model's own tokenizer.json). The toolkit's float cache of the embedded model is in the toolkit's
    form (model_type compressor_decoder), which convert_hf_to_gguf.py does not know; written again
    here in the standard Llama form, which keeps weight names and values as they are."""
    from compressor.sources import load_model
    from exporters.safetensors import write_model

    if (out / "config.json").is_file() and (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    log(f"writing the embedded model as a transformers folder in {out}")
    source = load_model("embedded", quiet=True)
    staging = out.with_name(f".{out.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    write_model(source.model, source.tokenizer, staging)
    written = json.loads((staging / "config.json").read_text())
    if written.get("model_type") != "llama":
        raise StepError(f"writing the transformers folder: config.json has model_type {written.get('model_type')!r}, "
                        "convert_hf_to_gguf.py needs 'llama'")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
    return out


# What convert_hf_to_gguf.py imports for this model. sentencepiece is imported even for a BPE
# tokenizer; a missing one goes to a folder of the cache, on the script's PYTHONPATH only.
CONVERT_NEEDS = ("torch", "numpy", "transformers")
CONVERT_EXTRA = ("sentencepiece",)


def _convert_path(tools: dict) -> str:
    absent = [m for m in CONVERT_NEEDS if importlib.util.find_spec(m) is None]
    if absent:
        raise StepError(f"converting to GGUF: convert_hf_to_gguf.py needs {', '.join(absent)}; "
                        f"pip install {' '.join(absent)}")
    extra = Path(tools["cache"]) / "convert-deps"
    missing = [m for m in CONVERT_EXTRA if importlib.util.find_spec(m) is None and not (extra / m).exists()]
    if missing:
        log(f"installing {', '.join(missing)} for convert_hf_to_gguf.py into {extra}")
        run_step("installing the converter's requirements", _pip("install", "--target", str(extra), *missing),
                 Path(tools["cache"]) / "logs" / "pip-convert-deps.log", hint=f"pip install {' '.join(missing)}")
    # The vendored gguf-py first: the converter is written against that version of it.
    return os.pathsep.join([tools["gguf_py"], str(extra), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


def convert(model_folder: Path, out: Path, tools: dict | None = None) -> Path:
    """A transformers folder as an unquantized GGUF file: f32 (f16 where the converter has no f32)."""
    tools = tools or build_tools()
    if out.is_file():
        return out
    env = dict(os.environ, PYTHONPATH=_convert_path(tools))
    help_text = subprocess.run([sys.executable, tools["convert_script"], "--help"], capture_output=True, text=True,
                               env=env).stdout
    outtype = "f32" if re.search(r"\bf32\b", help_text) else "f16"
    log(f"converting {model_folder} to a {outtype} GGUF file")
    partial = out.with_name(out.name + ".partial")
    run_step(f"converting to GGUF (convert_hf_to_gguf.py --outtype {outtype})",
             [sys.executable, tools["convert_script"], model_folder, "--outtype", outtype, "--outfile", partial],
             out.with_suffix(".convert.log"), env=env,
             hint="see the log")
    os.replace(partial, out)
    return out


def imatrix(gguf_f32: Path, calibration_text: str, out: Path, tools: dict | None = None) -> Path:
    """llama-imatrix over the whole calibration text in chunks of CONTEXT tokens (`-c`; its `--chunk`
    is the chunk to start from), THREADS threads."""
    tools = tools or build_tools()
    if out.is_file():
        return out
    text_file = out.with_suffix(".txt")
    text_file.write_text(calibration_text)
    log(f"computing the importance matrix on {len(calibration_text)} characters of calibration text")
    partial = out.with_name(out.name + ".partial.gguf")
    output = run_step("computing the importance matrix (llama-imatrix)",
                      [tools["llama-imatrix"], "-m", gguf_f32, "-f", text_file, "-o", partial, "-c", CONTEXT,
                       "-b", CONTEXT, "-t", THREADS, "--no-ppl"], out.with_suffix(".log"))
    if not partial.is_file():
        raise StepError(f"computing the importance matrix: llama-imatrix wrote no {partial}: {output[-300:]}")
    os.replace(partial, out)
    return out


def quantize(gguf_f32: Path, qtype: str, out: Path, imatrix: Path | None = None, tools: dict | None = None) -> Path:
    """llama-quantize to `qtype`. The importance matrix is used only when given; main() gives it to
    Q2_K and IQ4_XS (QUANT_TYPES), which llama.cpp recommends it for, and to none of the others."""
    tools = tools or build_tools()
    if out.is_file():
        return out
    log(f"quantizing to {qtype}{' with the importance matrix' if imatrix else ''}")
    partial = out.with_name(out.name + ".partial")
    matrix = ["--imatrix", imatrix] if imatrix else []
    command = [tools["llama-quantize"], *matrix, gguf_f32, partial, qtype, THREADS]
    run_step(f"quantizing to {qtype} (llama-quantize)", command, out.with_suffix(".log"))
    os.replace(partial, out)
    return out


def file_bytes(gguf: Path) -> int:
    return Path(gguf).stat().st_size


def bits_per_weight(gguf: Path, parameters: int) -> float:
    """8 x file bytes / parameters: the whole file (metadata and vocabulary included) over every weight."""
    return 8 * file_bytes(gguf) / parameters


def weight_types(gguf: Path) -> dict[str, float]:
    """Share of the file's weights (2-D tensors, by element) in each ggml type, largest first. A
    type name alone says little here: llama.cpp falls back to another type for a tensor whose rows
    are not a multiple of its 256-wide super-block (this model's width is 576), and keeps the tied
    embedding in Q8_0 or finer, so "Q2_K" is mostly Q4_0."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for tensor in GGUFReader(str(gguf)).tensors:
        if len(tensor.shape) >= 2:
            counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + int(tensor.n_elements)
    total = sum(counts.values())
    return {name: n / total for name, n in sorted(counts.items(), key=lambda item: -item[1])}


# ------------------------------------------------------------------------------- measuring


def _open(gguf: Path, n_ctx: int, logits_all: bool, threads: int):
    from llama_cpp import Llama

    # llama-cpp-python's defaults otherwise: f16 KV cache, flash attention off, memory-mapped weights.
    return Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=CONTEXT, n_ubatch=CONTEXT, logits_all=logits_all,
                 n_threads=threads, n_threads_batch=threads, verbose=False)


def score(gguf: Path, windows: torch.Tensor, threads: int = THREADS) -> float:
    """Perplexity scored as compressor.evaluate.perplexity scores it: each window (token ids, no BOS
    added) run alone in a fresh context, all its tokens in one batch; every position but the last
    predicts the next token (0..n-2 predict 1..n-1); NLL summed in float32 over all windows, exp of
    the mean."""
    n_windows, seq_len = windows.shape
    llm = _open(gguf, seq_len, logits_all=True, threads=threads)
    total_nll, total_tokens = 0.0, 0
    try:
        for window in windows:
            llm.reset()  # the next eval clears the KV cache from position 0
            llm.eval(window.tolist())
            logits = torch.from_numpy(llm.scores[:seq_len].copy())
            targets = window[1:]
            total_nll += float(torch.nn.functional.cross_entropy(logits[:-1], targets, reduction="sum"))
            total_tokens += targets.numel()
    finally:
        llm.close()
    return math.exp(total_nll / total_tokens)


def same_token_ids(gguf: Path, text: str, ids: torch.Tensor) -> bool:
    """Whether the GGUF file's own tokenizer turns `text` into `ids` (the toolkit's tokens, in order,
    from the start of the text): the windows mean the same to both."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    try:
        own = llm.tokenize(text.encode(), add_bos=False, special=False)
    finally:
        llm.close()
    flat = ids.reshape(-1).tolist()
    return own[:len(flat)] == flat


def _prompt_tokens(llm, count: int) -> list[int]:
    from compressor.data import embedded_text

    tokens = llm.tokenize(embedded_text().encode(), add_bos=False)
    return tokens[:count]


def decode_speed(gguf: Path, threads: int = THREADS, prompt: int = 128, new: int = 64, repeats: int = 5) -> dict:
    """Through the bindings: prefill of a `prompt`-token prompt (the start of the embedded text) in one
    batch, then `new` greedy decode steps of one token each; medians over `repeats` runs, tok/s."""
    import numpy as np
    import llama_cpp

    llm = _open(gguf, prompt + new, logits_all=False, threads=threads)
    tokens = _prompt_tokens(llm, prompt)
    vocab = llm.n_vocab()

    def last_argmax() -> int:
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,)).argmax())

    prefill, decode = [], []
    try:
        for _ in range(repeats + 1):  # the first run warms caches and is not counted
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(tokens)
            token = last_argmax()
            t1 = time.perf_counter()
            for _ in range(new):
                llm.eval([token])
                token = last_argmax()
            t2 = time.perf_counter()
            prefill.append(t1 - t0)
            decode.append(t2 - t1)
    finally:
        llm.close()
    prefill, decode = prefill[1:], decode[1:]
    return {"prefill_tok_s": prompt / statistics.median(prefill), "decode_tok_s": new / statistics.median(decode),
            "threads": threads, "prompt": prompt, "new": new, "repeats": repeats}


def bench_speed(gguf: Path, tools: dict, threads: int = THREADS, prompt: int = 128, new: int = 64,
                repeats: int = 5) -> dict:
    """llama-bench's own figures (its defaults otherwise, e.g. flash attention auto), as a cross-check."""
    output = run_step("llama-bench", [tools["llama-bench"], "-m", gguf, "-t", threads, "-p", prompt, "-n", new,
                                      "-r", repeats, "-o", "json"], Path(gguf).with_suffix(".bench.log"),
                      stdout_only=True)
    try:
        tests = json.loads(output)
    except ValueError:
        raise StepError(f"llama-bench: no JSON in its output (log: {Path(gguf).with_suffix('.bench.log')})") from None
    result = {}
    for test in tests:
        key = "prefill_tok_s" if test.get("n_prompt") and not test.get("n_gen") else "decode_tok_s"
        result[key] = test["avg_ts"]
        result[key.replace("tok_s", "stddev")] = test.get("stddev_ts")
    result["flash_attn"] = tests[0].get("flash_attn") if tests else None
    return result


# ------------------------------------------------------------------------------------------ main


def _cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds busy on the whole machine, CPU seconds of this process and its finished children),
    or None where /proc/stat is not there."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    own = os.times()
    return ((user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"),
            own.user + own.system + own.children_user + own.children_system)


def other_cores_busy(seconds: float) -> float | None:
    """Cores the rest of the machine keeps busy over the next `seconds` (None without /proc/stat)."""
    before, started = _cpu_seconds(), time.perf_counter()
    time.sleep(seconds)
    after = _cpu_seconds()
    if not before or not after:
        return None
    return max((after[0] - before[0]) - (after[1] - before[1]), 0.0) / (time.perf_counter() - started)


def wait_for_quiet(limit: float, threshold: float = QUIET_CORES, probe: float = 5.0) -> float | None:
    """Waits up to `limit` seconds for a `probe`-second stretch in which other processes keep fewer
    than `threshold` cores busy; the seconds waited, or None when the machine never went quiet."""
    started = time.perf_counter()
    log(f"waiting up to {limit:.0f} s for the machine to be quiet before timing")
    while time.perf_counter() - started < limit:
        busy = other_cores_busy(probe)
        if busy is None or busy < threshold:
            return time.perf_counter() - started
    return None


def measure_quality(name: str, gguf: Path, windows: torch.Tensor, parameters: int, with_imatrix: bool) -> dict:
    log(f"{name}: perplexity on {len(windows)} windows")
    row = {"type": name, "imatrix": with_imatrix, "bytes": file_bytes(gguf),
           "bits_per_weight": bits_per_weight(gguf, parameters), "weight_types": weight_types(gguf),
           "perplexity": score(gguf, windows)}
    log(f"{name}: perplexity {row['perplexity']:.3f}")
    return row


def measure_speed(row: dict, gguf: Path, tools: dict, cross_check: bool, repeats: int) -> None:
    log(f"{row['type']}: timing prefill and decode")
    # THREADS-thread runs slow down a lot when other work shares the cores (a thread waiting for a
    # core stalls every op), so the cores the rest of the machine kept busy meanwhile go with the figures.
    before, started = _cpu_seconds(), time.perf_counter()
    row["speed"] = decode_speed(gguf, repeats=repeats)
    if cross_check:
        row["llama_bench"] = bench_speed(gguf, tools, repeats=repeats)
    after = _cpu_seconds()
    if before and after:
        other = (after[0] - before[0]) - (after[1] - before[1])
        row["other_cores_busy_during_speed"] = max(other, 0.0) / (time.perf_counter() - started)


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# llama.cpp quantization of the embedded model", "",
             f"SmolLM2-135M-Instruct (the embedded model's float weights converted to an f32 GGUF), llama.cpp from "
             f"llama-cpp-python {meta['llama_cpp']['version']} (llama.cpp {str(meta['llama_cpp']['commit'])[:10]}). "
             f"Perplexity: WikiText-2 test, {meta['evaluation']['windows']} windows x {meta['evaluation']['seq_len']} "
             "tokens, the toolkit's token windows scored from the bindings' logits as compressor.evaluate.perplexity "
             f"scores them. Importance matrix: the embedded text ({meta['calibration']['characters']} characters, "
             f"{meta['calibration']['chunks']} chunks of {CONTEXT} tokens). Size: the whole GGUF file; bits/weight = "
             f"8 x bytes / {meta['parameters']} parameters. Speed: bindings, {THREADS} threads, prefill of "
             f"{meta['speed']['prompt']} tokens "
             f"and {meta['speed']['new']} greedy decode steps, median of {meta['speed']['repeats']}; llama-bench "
             f"(-t {THREADS} -p {meta['speed']['prompt']} -n {meta['speed']['new']}) beside it. "
             "Weights by type: the share of the 2-D weights in each ggml type; this model's rows of 576 are not "
             "a multiple of the K-quants' 256-wide blocks, so llama.cpp stores most of them in another type, and "
             f"the tied embedding stays Q8_0. Machine: {meta['machine']['cpu']}. Command: `{meta['command']}`.", "",
             "| type | imatrix | size MB | bits/weight | perplexity | decode tok/s | prefill tok/s "
             "| llama-bench decode tok/s | llama-bench prefill tok/s | weights by type |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        bench = row.get("llama_bench") or {}
        cross = " | ".join(f"{bench[k]:.1f}" if k in bench else "-" for k in ("decode_tok_s", "prefill_tok_s"))
        lines.append(f"| {row['type']} | {'yes' if row['imatrix'] else 'no'} | {row['bytes'] / 1e6:.1f} | "
                     f"{row['bits_per_weight']:.2f} | {row['perplexity']:.2f} | {row['speed']['decode_tok_s']:.1f} | "
                     f"{row['speed']['prefill_tok_s']:.1f} | {cross} | "
                     f"{', '.join(f'{t} {share:.0%}' for t, share in row['weight_types'].items())} |")
    lines += ["", "## Checks", ""] + [f"- {k}: {v}" for k, v in meta["checks"].items()] + [""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None,
                        help="where llama.cpp is built and the GGUF files kept (default ~/.cache/compressor-bench/...)")
    parser.add_argument("--types", default=",".join(QUANT_TYPES), help="comma-separated llama.cpp types")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per speed figure")
    parser.add_argument("--no-llama-bench", action="store_true", help="skip the llama-bench cross-check")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before timing, wait up to this long for other processes to leave the cores free")
    args = parser.parse_args()
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    unknown = [t for t in types if t not in QUANT_TYPES]
    if unknown:
        raise SystemExit(f"bench.llamacpp: unknown type {unknown[0]}; allowed: {', '.join(QUANT_TYPES)}")
    try:
        run_all(args, types)
    except StepError as exc:
        raise SystemExit(f"bench.llamacpp: {exc}") from None


def run_all(args, types: list[str]) -> None:
    from bench.common import command_line, machine, write_results
    from bench.quantization import evaluation_setup
    from compressor.data import embedded_text, evaluation_windows, load_text
    from compressor.evaluate import perplexity
    from compressor.process import quiet_transformers
    from compressor.sources import _embedded_cache, load_model

    quiet_transformers()
    started = time.perf_counter()
    tools = build_tools(args.cache)
    build_seconds = time.perf_counter() - started
    # One folder per embedded model file (its float cache is named after it), so another model file
    # is converted again rather than mixed with these.
    work = Path(tools["cache"]) / "models" / _embedded_cache().name
    f32 = convert(float_folder(work / "hf"), work / "f32.gguf", tools)

    eval_text, n_windows, seq_len, _ = evaluation_setup(False, "bench.llamacpp")
    source = load_model("embedded", quiet=True)
    windows = evaluation_windows(source.tokenizer, eval_text, n_windows, seq_len)
    parameters = sum(p.numel() for p in source.model.parameters())
    log("perplexity of the toolkit's float model (reference)")
    float_ppl = perplexity(source.model, windows.input_ids, True)
    del source
    same_ids = same_token_ids(f32, load_text(eval_text), windows.input_ids)

    calibration = embedded_text()
    matrix = imatrix(f32, calibration, work / "imatrix.gguf", tools)
    imatrix_log = work / "imatrix.log"
    log_text = imatrix_log.read_text(errors="replace") if imatrix_log.is_file() else ""
    chunks = re.search(r"computing over (\d+) chunks", log_text)
    files = {"f32": f32}
    rows = [measure_quality("f32", f32, windows.input_ids, parameters, False)]
    for qtype in types:
        with_imatrix = QUANT_TYPES[qtype]
        files[qtype] = quantize(f32, qtype, work / f"{qtype}.gguf", matrix if with_imatrix else None, tools)
        rows.append(measure_quality(qtype, files[qtype], windows.input_ids, parameters, with_imatrix))
    # All the timing together after the scoring, so that one quiet stretch of the machine covers it.
    waited = wait_for_quiet(args.wait_quiet) if args.wait_quiet > 0 else 0.0
    if waited is None:
        log("the machine did not go quiet; timing anyway")
    for row in rows:
        measure_speed(row, files[row["type"]], tools, not args.no_llama_bench, args.repeats)

    busy = [r["other_cores_busy_during_speed"] for r in rows if r.get("other_cores_busy_during_speed") is not None]
    gap = rows[0]["perplexity"] - float_ppl
    checks = {"f32 GGUF vs the toolkit's float model": (
        f"{rows[0]['perplexity']:.3f} vs {float_ppl:.3f} (difference {gap:+.3f}, tolerance {FLOAT_TOLERANCE}): "
        f"{'yes' if abs(gap) <= FLOAT_TOLERANCE else 'NO'}"),
        "the GGUF tokenizer gives the toolkit's token ids for the evaluation windows": "yes" if same_ids else "NO"}
    if busy:
        checks["cores other processes kept busy during the speed runs"] = (
            f"{min(busy):.2f}-{max(busy):.2f} of {os.cpu_count()}: "
            f"{'quiet' if max(busy) < QUIET_CORES else 'NOT quiet, the speed figures are slowed by other work'}")
    bindings = tools["bindings"]
    data = {
        "command": command_line(), "machine": machine(),
        "llama_cpp": {"version": tools["version"], "commit": tools["llama_cpp_commit"],
                      "bindings_version": bindings["version"],
                      "tools_build_seconds": tools["tools_build_seconds"],
                      "bindings_install_seconds": bindings.get("seconds"),
                      "setup_seconds_this_run": build_seconds,
                      "settings": {"threads": THREADS, "n_ctx": seq_len, "n_batch": CONTEXT, "kv_cache": "f16",
                                   "flash_attn": False, "bos": "none added (the toolkit's windows as they are)"}},
        "evaluation": dict(windows.record), "parameters": parameters,
        "calibration": {"text": "embedded", "characters": len(calibration), "chunk": CONTEXT,
                        "chunks": int(chunks.group(1)) if chunks else None,
                        "sha256": hashlib.sha256(calibration.encode()).hexdigest()},
        "speed": {"prompt": 128, "new": 64, "repeats": args.repeats, "threads": THREADS,
                  "waited_for_quiet_seconds": waited},
        "float_model_perplexity": float_ppl, "rows": rows, "checks": checks,
    }
    text = markdown(rows, data)
    print(text)
    json_path, md_path = write_results("llamacpp", data, text)
    log(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
