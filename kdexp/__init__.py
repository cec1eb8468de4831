"""kdexp: a Hydra-configured experiment runner for knowledge distillation."""
from pathlib import Path

__version__ = "0.1.0"


def config_dir() -> str:
    """Absolute path of the Hydra configs: top-level conf/ in a checkout or editable
    install, kdexp/conf inside an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"kdexp configs not found in {here / 'conf'} or {here.parent / 'conf'}")
