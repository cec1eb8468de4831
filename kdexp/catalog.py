"""What kdexp offers, one line per entry, read from the registries and the conf/ folder: the listings
of `python -m kdexp.catalog [methods|models|datasets|groups|all]` (console script `kdexp-list`) and
the text of `python -m kdexp.train --help` (Hydra's hydra/help config, stored by
kdexp.config.register_configs). Both are built from what is registered and what conf/ holds, so a
new method, model, dataset or config group shows up without editing them; an entry's description
is the first paragraph of its docstring (kdexp.registry.doc_summary)."""
import dataclasses
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from kdexp import config_dir, group_options
from kdexp.data import DATASETS
from kdexp.methods import METHODS
from kdexp.models import MODELS
from kdexp.registry import doc_summary

KINDS = ("methods", "models", "datasets", "groups", "all")
# conf/ folders that configure Hydra itself (launchers; the sweeper override), not the experiment
HYDRA_FOLDERS = ("hydra", "sweeper")

# The run-wide keys of kdexp.config.Config that are not config groups (field comments are not
# introspectable); tests/test_help.py fails when a Config field has neither a group folder nor a line here.
RUN_KEYS = {
    "seed": "seed of the student's run (initialization, batch order); the teacher has teacher.seed",
    "epochs": "training epochs of the student",
    "batch_size": "training batch size of the student",
    "eval_batch_size": "batch size of evaluation (no gradients: larger is faster)",
    "optim": "the student's optimizer (adam, adamw, sgd, dot) and LR schedule (none, cosine, step, dann); "
             "a teacher has its own under teacher.optim",
    "resume": "continue an interrupted run directory from checkpoints/last.pt",
    "force": "rerun a run directory whose metrics.json says done (otherwise it is skipped)",
    "checkpoint_every": "epochs between writes of checkpoints/last.pt",
    "progress": "progress bar (shown only when stdout is a terminal)",
    "paths": "where datasets are read and trained teachers are cached (defaults: env KDEXP_DATA_DIR, "
             "KDEXP_CACHE_DIR)",
    "teachers": "a teacher ensemble instead of teacher (softmax outputs averaged): option names, "
                "teachers=[cnn,lenet5], or mappings {base: NAME, key: value}",
    "chain": "a multi-stage pipeline (experiment=takd): stages {name, overrides, teacher: EARLIER_STAGE}; "
             "[]: one run",
    "born_again": "born-again networks (experiment=born_again): K students of one architecture, each the "
                  "next one's teacher, then their ensemble",
    "tags": "free-form labels of the run (tags=[baseline,ablation]): in metrics.json, the HParams tab and every "
            "logger",
    "monitor": "the metric (and max | min | auto) that picks checkpoints/best.pt and the reported best epoch",
    "early_stop": "stop the student after patience epochs in which metric did not improve (patience null: off)",
    "not_applied": "set by kdexp's sweeper: overrides of a sweep across methods that this job's method has no "
                   "key for (recorded, not applied)",
}


# ------------------------------------------------------------------------------ entries
def columns(rows: Sequence[Tuple[str, ...]], indent: str = "") -> List[str]:
    """Rows of cells as aligned lines (each column as wide as its widest cell; the last is not padded)."""
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return [indent + "  ".join([c.ljust(w) for c, w in zip(r, widths)] + [r[-1]]).rstrip() for r in rows]


def method_requirements(name: str) -> str:
    """A method's requirements in short: what teacher it needs, its use of labels, whether it fuses."""
    r = METHODS.meta(name)["requires"]
    return f"teacher={r.teacher} labels={r.labels}" + (" fusable" if r.fusable else "")


def method_rows(with_requirements: bool = True) -> List[Tuple[str, ...]]:
    rows = []
    for name in METHODS.names():
        description = METHODS.meta(name)["description"]
        rows.append((name, method_requirements(name), description) if with_requirements else (name, description))
    return rows


def model_rows() -> List[Tuple[str, str]]:
    return [(name, doc_summary(MODELS.get(name))) for name in MODELS.names()]


def _yaml_comment(path: str) -> str:
    """The first comment line of an option's file (how an option without a registry entry describes itself)."""
    with open(path) as f:
        for line in f:
            if line.startswith("#") and not line.startswith("# @package"):
                return line.lstrip("#").strip()
    return ""


def dataset_rows(conf: str) -> List[Tuple[str, str, str]]:
    """conf/dataset options and registered datasets, each once: (name, how to pick it, description).
    Option names equal registry names; a registered dataset without an option file says so, an option
    without a registered builder is described by its file's first comment."""
    options = group_options(conf, "dataset")
    rows = []
    for name in sorted(set(options) | set(DATASETS.names())):
        if name in DATASETS:
            description = doc_summary(DATASETS.get(name))
        else:
            description = _yaml_comment(os.path.join(conf, "dataset", f"{name}.yaml"))
        pick = f"dataset={name}" if name in options else f"(no conf/dataset/{name}.yaml)"
        rows.append((name, pick, description))
    return rows


# ------------------------------------------------------------------------------ config groups
def config_groups(conf: str) -> List[str]:
    """The experiment's config groups: every folder of conf/ that holds options, but Hydra's own."""
    return sorted(d for d in os.listdir(conf) if d not in HYDRA_FOLDERS and os.path.isdir(os.path.join(conf, d))
                  and group_options(conf, d))


def default_options(conf: str) -> Dict[str, str]:
    """Group -> its option in conf/config.yaml's defaults list (groups set to null left out)."""
    from omegaconf import OmegaConf

    defaults = OmegaConf.to_container(OmegaConf.load(os.path.join(conf, "config.yaml"))).get("defaults", [])
    return {group: option for entry in defaults if isinstance(entry, dict)
            for group, option in entry.items() if option is not None and not group.startswith("override ")}


def _options_line(conf: str, group: str, defaults: Dict[str, str], sep: str = ", ") -> str:
    return sep.join(o + (" (default)" if o == defaults.get(group) else "") for o in group_options(conf, group))


def group_rows(conf: str) -> List[Tuple[str, str]]:
    """(group, its options with the default marked) for every config group."""
    defaults = default_options(conf)
    return [(group, _options_line(conf, group, defaults)) for group in config_groups(conf)]


def hydra_line(conf: str) -> str:
    """kdexp's options for Hydra's own groups (launchers, sweeper), in short."""
    defaults = default_options(conf)
    parts = [f"{group}={_options_line(conf, group, defaults, '|')}" for group in ("hydra/launcher", "sweeper")
             if os.path.isdir(os.path.join(conf, group))]
    return "; ".join(parts + ["--hydra-help lists Hydra's own groups (installed launchers, sweepers) and flags"])


# ------------------------------------------------------------------------------ run-wide keys
def run_key_rows(schema: type, conf: str) -> List[Tuple[str, str]]:
    """(key, description) for every field of the run's schema (kdexp.config.Config) that is not a
    config group; a field holding a dataclass shows its keys (optim.* -> name, lr, ...)."""
    groups = set(config_groups(conf))
    rows = []
    for f in dataclasses.fields(schema):
        if f.name in groups:
            continue
        key, description = f.name, RUN_KEYS.get(f.name, "")
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(sub):
            key = f"{f.name}.*"
            description += f"; keys: {', '.join(s.name for s in dataclasses.fields(sub))}"
        rows.append((key, description))
    return rows


# ------------------------------------------------------------------------------ --help
START = [
    ("python -m kdexp.train method=kd method.temperature=4", "one run, in outputs/runs/<date_time>_<method>"),
    ("python -m kdexp.train -m method=ce,kd method.temperature=2,8", "a sweep, in outputs/multirun/<date_time>"),
    ("tensorboard --logdir outputs", "curves and the HParams tab of every run"),
]


def help_text(schema: type, conf: str) -> str:
    """The body of --help (between Hydra's header and its flags): commands to start with, the config
    groups, the methods, how to see keys and defaults, the run-wide keys."""
    lines = ["== Start here =="] + columns(START, "  ")
    lines += ["", "== Config groups: group=option =="] + columns(group_rows(conf), "  ")
    lines += ["  Hydra: " + hydra_line(conf)]
    lines += ["", "== Methods: method=NAME =="] + columns(method_rows(with_requirements=False), "  ")
    lines += ["", "== Keys: key=value =="]
    lines += columns([
        ("python -m kdexp.train method=dkd --cfg job --package method", "a method's keys and defaults"),
        ("python -m kdexp.train [overrides] --cfg job", "the whole composed config, every key"),
        ("python -m kdexp.catalog [methods|models|datasets|groups|all]", "listings (console script kdexp-list)"),
    ], "  ")
    lines += ["", "Run-wide keys:"] + columns(run_key_rows(schema, conf), "  ")
    return "\n".join(lines)


def help_config(schema: type, conf: Optional[str] = None) -> dict:
    """kdexp's hydra/help node (app_name, header, footer, template; see Hydra's "Customizing
    application's help"). The composed config ($CONFIG) is left out, as it is long: the text says how
    to print it. Hydra fills the template with string.Template, so a `$` of the text is escaped."""
    conf = conf or config_dir()
    body = help_text(schema, conf).replace("$", "$$")
    return {
        "app_name": "kdexp",
        "header": "${hydra.help.app_name}: knowledge distillation and transfer learning experiments in PyTorch, "
                  "configured with Hydra.\nOne run = one option of each config group (dataset, teacher, student, "
                  "method, hardware, ...)\nplus key=value overrides; -m sweeps over comma-separated values. Runs "
                  "log to TensorBoard\nand metrics.json in their run directory.\n",
        "footer": "Powered by Hydra (https://hydra.cc); --hydra-help for Hydra's own help.",
        "template": "${hydra.help.header}\n" + body + "\n\n== Flags ==\n$FLAGS_HELP\n\n${hydra.help.footer}\n",
    }


def help_page(schema: type) -> str:
    """The text Hydra prints for `--help` with hydra/help=kdexp (the `help_config` template filled in:
    its header, body, Hydra's flags, footer), rendered directly: Hydra lists every config group of
    its own and of the app to fill $HYDRA_CONFIG_GROUPS / $APP_CONFIG_GROUPS whether the template
    shows them or not, which takes ~6 s here (a repository copy per group)."""
    import string

    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import get_args_parser
    from omegaconf import OmegaConf

    node = OmegaConf.create({"hydra": {"help": help_config(schema)}})
    template = string.Template(OmegaConf.to_container(node, resolve=True)["hydra"]["help"]["template"])
    return template.substitute(FLAGS_HELP=Hydra.format_args_help(get_args_parser()), HYDRA_CONFIG_GROUPS="",
                               APP_CONFIG_GROUPS="", CONFIG="")


# ------------------------------------------------------------------------------ listings
def listing(kind: str, conf: Optional[str] = None) -> List[str]:
    """The lines of `python -m kdexp.catalog KIND` (KIND in KINDS; "all": every kind under a heading)."""
    conf = conf or config_dir()
    if kind == "all":
        sections = [[f"== {k} =="] + listing(k, conf) for k in KINDS if k != "all"]
        return [line for section in sections for line in section + [""]][:-1]  # a blank line between sections
    rows = {"methods": method_rows, "models": model_rows, "datasets": lambda: dataset_rows(conf),
            "groups": lambda: group_rows(conf)}[kind]()
    return columns(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`kdexp-list [methods|models|datasets|groups|all]` (default all): one line per entry; exit 2 on an
    unknown kind."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args in (["-h"], ["--help"]):
        print(f"usage: kdexp-list [{'|'.join(KINDS)}]  (default: all): registered entries, one line each")
        return 0
    if len(args) > 1 or (args and args[0] not in KINDS):
        what = f"unknown kind {args[0]!r}" if len(args) == 1 else f"one kind expected, got {' '.join(args)!r}"
        print(f"kdexp-list: {what}; valid kinds: {', '.join(KINDS)}", file=sys.stderr)
        return 2
    print("\n".join(listing(args[0] if args else "all")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
