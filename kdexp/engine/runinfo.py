"""What makes a run reproducible, saved into its directory: the resolved config, the
command line, the git commit (+ dirty flag) of the kdexp source, package versions.
The git state and the versions are read once per process (two git calls cost ~30 ms a run): they
describe the code this process imported at its start, which edits made during a sweep don't change."""
import functools
import importlib.metadata
import os
import platform
import subprocess
import sys

from omegaconf import OmegaConf

from kdexp.io import atomic_json_dump

PACKAGES = ("kdexp", "torch", "torchvision", "hydra-core", "omegaconf", "numpy", "scikit-learn", "tensorboard")


@functools.lru_cache(maxsize=None)
def _git_state(path: str) -> tuple:
    def git(*args):
        return subprocess.run(["git", "-C", path, *args], capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None, None
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
        return head.stdout.strip(), dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def git_state(path: str) -> dict:
    commit, dirty = _git_state(path)
    return {"commit": commit, "dirty": dirty}


@functools.lru_cache(maxsize=None)
def _package_versions() -> tuple:
    out = []
    for name in PACKAGES:
        try:
            out.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            out.append((name, None))
    return tuple(out)


def package_versions() -> dict:
    return dict(_package_versions())


def write_run_info(run_dir: str, cfg) -> None:
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(OmegaConf.to_yaml(cfg, resolve=True))
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    atomic_json_dump({
        "command": [sys.executable, *sys.argv], "cwd": os.getcwd(), "git": git_state(src),
        "packages": package_versions(), "python": sys.version.split()[0], "platform": platform.platform(),
    }, os.path.join(run_dir, "run_info.json"))
