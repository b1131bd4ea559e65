"""The launch scripts in dry-run mode print the expected commands; shellcheck is clean."""

import os
import shlex
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "tpu_scripts")
POD_ENV = {"TPU_NAME": "rl-pod", "ZONE": "us-east5-a", "WORKDIR": "gs://bucket/run1",
           "TRAIN_ARGS": "--config.mesh.shape=(1,8,4) --config.rl.epochs=2"}


def dry_run(script: str, *args: str, **env: str) -> list[list[str]]:
    """Runs `script --dry-run args` and returns the printed commands, each split into words."""
    full_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **env}
    out = subprocess.run([os.path.join(SCRIPTS, script), "--dry-run", *args], env=full_env,
                         capture_output=True, text=True, timeout=30, check=True)
    return [shlex.split(line[2:]) for line in out.stdout.splitlines() if line.startswith("+ ")]


def test_pod_lifecycle_commands():
    [create] = dry_run("pod.sh", "create", **POD_ENV, SPOT="1", PROJECT="proj")
    assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert create[5] == "rl-pod" and "--spot" in create
    assert create[create.index("--accelerator-type") + 1] == "v5p-64"
    assert create[create.index("--project") + 1] == "proj"

    archive, scp, install = dry_run("pod.sh", "setup", **POD_ENV)
    assert archive[:2] == ["git", "-C"] and "archive" in archive
    assert scp[4] == "scp" and "--worker=all" in scp
    assert "--worker=all" in install and "pip install" in install[-1]
    assert "jax[tpu]==0.10.2" in install[-1]
    assert "-e '.[gcs]'" in install[-1]     # gs:// workdirs need gcsfs
    [clone] = dry_run("pod.sh", "setup", **POD_ENV, REPO_URL="https://example.com/r.git")
    assert "git clone --depth 1 --branch main https://example.com/r.git" in clone[-1]

    [launch] = dry_run("pod.sh", "launch", **POD_ENV)
    assert "--worker=all" in launch
    remote = shlex.split(launch[-1])  # what each worker's shell runs
    assert "RLVER_DISTRIBUTED=1" in remote
    start = remote.index("-m")
    assert remote[start + 1] == "rlver_jax.train"
    assert remote[remote.index("--workdir") + 1] == "gs://bucket/run1"
    # The parenthesised override survives the remote shell as one word.
    assert "--config.mesh.shape=(1,8,4)" in remote and "--config.rl.epochs=2" in remote

    [logs] = dry_run("pod.sh", "logs", **POD_ENV)
    assert "--worker=0" in logs and "tail" in logs[-1]
    [stop] = dry_run("pod.sh", "stop", **POD_ENV)
    assert "kill -INT" in stop[-1]
    [delete] = dry_run("pod.sh", "delete", **POD_ENV)
    assert delete[4] == "delete" and "--quiet" in delete


def test_pod_requires_settings():
    out = subprocess.run([os.path.join(SCRIPTS, "pod.sh"), "--dry-run", "create"],
                         env={"PATH": os.environ["PATH"]}, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode != 0 and "TPU_NAME" in out.stderr


def test_gpu_launcher_commands():
    env = {"WORKDIR": "/shared/run", "REPO_DIR": "/opt/rlver",
           "TRAIN_ARGS": "--config.mesh.shape=(2,8,1)"}
    commands = dry_run("gpu_launch.sh", "ssh", HOSTS="gpu0 gpu1 gpu2", PORT="2222", **env)
    assert [c[1] for c in commands] == ["gpu0", "gpu1", "gpu2"]
    for i, command in enumerate(commands):
        remote = shlex.split(command[-1])
        assert "RLVER_COORDINATOR=gpu0:2222" in remote
        assert "RLVER_NUM_PROCESSES=3" in remote and f"RLVER_PROCESS_ID={i}" in remote
        assert "--config.mesh.shape=(2,8,1)" in remote
    [srun] = dry_run("gpu_launch.sh", "slurm", NODES="4", PARTITION="a100", **env)
    assert srun[0] == "srun" and srun[srun.index("--nodes") + 1] == "4"
    assert srun[srun.index("--ntasks-per-node") + 1] == "1"
    assert srun[srun.index("--partition") + 1] == "a100"
    assert "rlver_jax.train" in srun and "--config.mesh.shape=(2,8,1)" in srun
    stops = dry_run("gpu_launch.sh", "ssh-stop", HOSTS="gpu0 gpu1")
    assert len(stops) == 2 and all("kill -INT" in s[-1] for s in stops)


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    scripts = sorted(f for f in os.listdir(SCRIPTS) if f.endswith(".sh"))
    out = subprocess.run([shellcheck, "-x", *scripts], cwd=SCRIPTS, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
