"""The deployment files: the systemd units (systemd-analyze verify, where it is installed), the
Dockerfile (built where a docker daemon runs and has the base image), and their aigw command
lines, checked against the CLI itself."""

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.gateway import AIGW
from tests.support.proxy import REPO_ROOT

UNITS = sorted((REPO_ROOT / "scripts" / "systemd").glob("*.service"))
INSTALLED_AIGW = "/opt/aigw/.venv/bin/aigw"


def exec_start(unit: Path) -> list[str]:
    text = unit.read_text().replace("\\\n", " ")
    (line,) = re.findall(r"^ExecStart=(.*)$", text, re.M)
    return shlex.split(line)


def dockerfile_entrypoint() -> list[str]:
    text = (REPO_ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    (line,) = re.findall(r"^ENTRYPOINT (.*)$", text, re.M)
    return json.loads(line)


def test_there_is_a_unit_for_the_proxy_and_one_for_sync():
    assert [u.name for u in UNITS] == ["aigw-proxy.service", "aigw-sync.service"]


@pytest.mark.parametrize("argv", [*(exec_start(u) for u in UNITS), dockerfile_entrypoint()],
                         ids=[*(u.name for u in UNITS), "Dockerfile"])
def test_each_command_line_is_one_the_cli_takes(argv):
    """The flags as written parse: `--help` after them runs only click's parser."""
    assert argv[0] in (INSTALLED_AIGW, "aigw")
    done = subprocess.run([AIGW, *argv[1:], "--help"], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: aigw")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_the_units_verify(tmp_path):
    for unit in UNITS:  # the installed path, here the test's own aigw
        (tmp_path / unit.name).write_text(unit.read_text().replace(INSTALLED_AIGW, AIGW))
    done = subprocess.run(["systemd-analyze", "verify", *sorted(map(str, tmp_path.iterdir()))],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def docker_can_build() -> str | None:
    """Why the Dockerfile cannot be built here, or None."""
    if shutil.which("docker") is None:
        return "no docker here"
    if subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode != 0:
        return "no docker daemon here"
    base = re.search(r"^FROM (\S+)", (REPO_ROOT / "Dockerfile").read_text(), re.M).group(1)
    if subprocess.run(["docker", "image", "inspect", base], capture_output=True,
                      timeout=30).returncode != 0:
        return f"the base image {base} is not here (nothing is pulled in a test)"
    return None


NO_DOCKER_BUILD = docker_can_build()


@pytest.mark.skipif(NO_DOCKER_BUILD is not None, reason=str(NO_DOCKER_BUILD))
def test_the_image_builds_and_its_aigw_runs():
    tag = "aigw-test-build"
    build = subprocess.run(["docker", "build", "-q", "-t", tag, str(REPO_ROOT)],
                           capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr
    try:
        done = subprocess.run(["docker", "run", "--rm", "--network", "none", tag, "--help"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "--workers" in done.stdout, done.stderr
    finally:
        subprocess.run(["docker", "image", "rm", "-f", tag], capture_output=True, timeout=120)
