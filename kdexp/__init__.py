"""kdexp: a Hydra-configured experiment runner for knowledge distillation."""
import os
from pathlib import Path
from typing import List

__version__ = "0.1.0"


def config_dir() -> str:
    """Absolute path of the Hydra configs: top-level conf/ in a checkout or editable
    install, kdexp/conf inside an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"kdexp configs not found in {here / 'conf'} or {here.parent / 'conf'}")


def group_options(conf: str, group: str) -> List[str]:
    """The options of a config group: the YAML files of its folder (<conf>/<group>), by name."""
    folder = os.path.join(conf, group)
    return sorted(f[:-len(".yaml")] for f in os.listdir(folder) if f.endswith(".yaml"))
