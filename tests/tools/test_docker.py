"""docker/: the compose file and the Dockerfile, read as data (no Docker engine runs here): the
compose file parses, its services use only the images its build sections make from
docker/Dockerfile, the workers reach the scheduler it starts, the GPU worker advertises the Dask
resource GPU stages declare, and the Dockerfile installs the project the way `make` does
(pyproject.toml's dependencies under constraints.txt, extras that exist), nothing else."""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_services_use_the_images_the_dockerfile_builds():
    services = compose()["services"]
    assert {"scheduler", "worker", "gpu-worker", "client"} <= set(services)
    built = {}
    for name, s in services.items():
        build = s.get("build")
        if build:
            dockerfile = (DOCKER / build["context"] / build["dockerfile"]).resolve()
            assert dockerfile == DOCKER / "Dockerfile" and dockerfile.is_file(), name
            built.setdefault(s["image"], build["args"])
    assert set(built) == {"mm1-pipeline:cpu", "mm1-pipeline:gpu"}
    assert {s["image"] for s in services.values()} <= set(built)
    assert "whl/cpu" in built["mm1-pipeline:cpu"]["TORCH_INDEX"] and "cpu" not in built["mm1-pipeline:gpu"]["TORCH_INDEX"]
    assert services["gpu-worker"]["image"] == "mm1-pipeline:gpu"


def test_workers_reach_the_scheduler_and_the_gpu_worker_advertises_gpu():
    c = compose()
    services = c["services"]
    sched = services["scheduler"]["command"]
    port = sched[sched.index("--port") + 1]
    for name in ("worker", "gpu-worker"):
        cmd = services[name]["command"]
        assert cmd[:3] == ["dask", "worker", f"tcp://scheduler:{port}"], name
        assert "scheduler" in services[name]["depends_on"]
    gpu = services["gpu-worker"]
    assert gpu["command"][gpu["command"].index("--resources") + 1] == "GPU=1"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "--resources" not in services["worker"]["command"]
    assert f"tcp://scheduler:{port}" in services["client"]["command"]
    used = {v.split(":")[0] for s in services.values() for v in s.get("volumes", [])}
    assert used <= set(c["volumes"])
    assert all(p.startswith("127.0.0.1:") for s in services.values() for p in s.get("ports", []))


def _instructions(text: str) -> list[str]:
    """Dockerfile instructions with their continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += " " + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            lines.append(current.strip())
            current = ""
    return lines


def test_the_dockerfile_installs_the_project_with_the_pyproject_pins():
    instructions = _instructions((DOCKER / "Dockerfile").read_text())
    copied = [i for i in instructions if i.startswith("COPY ")]
    assert any("pyproject.toml" in c and "constraints.txt" in c for c in copied)
    runs = " && ".join(i[4:] for i in instructions if i.startswith("RUN "))
    pip = [shlex.split(cmd.strip()) for cmd in runs.split("&&") if "pip install" in cmd]
    assert len(pip) == 1, pip
    args = pip[0]
    assert args[:2] == ["pip", "install"] and args[args.index("-c") + 1] == "constraints.txt"
    targets = [a for a in args[2:] if not a.startswith("-") and a not in ("constraints.txt",) and
               not a.startswith(("http", '"$', "${"))]
    assert targets == [".[${EXTRAS}]"], targets  # the project itself, no second list of packages
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for s in compose()["services"].values():
        if "build" in s:
            assert set(s["build"]["args"]["EXTRAS"].split(",")) <= extras
    default = re.search(r"ARG EXTRAS=(\S+)", (DOCKER / "Dockerfile").read_text()).group(1)
    assert set(default.split(",")) <= extras
    config = re.search(r"DASK_CONFIG=/opt/mm1-pipeline/(\S+)", (DOCKER / "Dockerfile").read_text()).group(1)
    assert (ROOT / config / "dask-worker.yaml").is_file()  # the workers get the runner's settings


def test_the_torchrun_example_is_valid_shell_and_runs_the_trainer():
    script = DOCKER / "torchrun-multinode.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "torchrun" in text and "-m tools.cli train" in text and "mm1-pipeline:gpu" in text
    assert (ROOT / "recipes" / "train" / "mm1-3b.yaml").is_file()
