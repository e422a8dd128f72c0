"""The command line around Hydra: `--help` written from the shipped config, and every override checked first.

Why check before Hydra runs: Hydra reports a composition mistake (`batchsize=4`, `model=sd3`) with exit code 1 and
advice to write `+batchsize=4`, which runs and ignores the key; and with a launcher such as submitit each sweep
job composes its own config on its node, so one bad value would fail every Slurm task. So `start` parses the
command line with Hydra's own parser, composes each job's config with Hydra's own loader and search path (exactly
what @hydra.main will compose), checks the overrides and then every job's settings, and only then lets
@hydra.main run unchanged: `hydra.*` overrides, -m sweeps and launchers behave as Hydra documents.
"""

import copy
import difflib
import os
import re
import shutil
import sys
import textwrap

from omegaconf import OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from sdbatch import SdbatchError
from sdbatch.settings import CONF_DIR

TEXT_KEYS = "scheduler.options."  # free-form keyword arguments: `+scheduler.options.KEY=VALUE` may add one


def start(config_name: str, problems_of, argv: list[str] | None = None) -> None:
    """Print --help and exit 0, or exit 2 with one paragraph for a mistake anywhere in the command line.
    problems_of(cfg) lists what is wrong with a composed config (settings.run_problems)."""
    from hydra._internal.utils import get_args_parser  # the parser @hydra.main uses (Hydra 1.3's internals)

    parser = get_args_parser()
    parser.error = parse_error
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
        if args.help:
            print(help_text(config_name))
            sys.exit(0)
        hydra_own = args.cfg or args.info or args.hydra_help or args.shell_completion
        if not (hydra_own or args.config_path or args.config_name):  # else the job checks the settings
            preflight(config_name, args.overrides, args.multirun, args.config_dir, problems_of)
    except SdbatchError as error:
        print(f"sdbatch: error: {error}", file=sys.stderr)
        sys.exit(2)


def parse_error(message: str):
    """argparse's error as one paragraph (it would print its usage and exit 2)."""
    raise SdbatchError(f"Invalid command line: {message}; options such as -m go before the key=value settings "
                       "(see --help).")


def preflight(config_name: str, lines: list[str], multirun: bool, config_dir: str | None, problems_of) -> None:
    """Raise SdbatchError for unknown keys and options, appended or deleted settings, then bad settings in any job."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    try:
        hydra = make_hydra(config_dir)
        overrides = parse(lines, hydra.config_loader)
        problems = override_problems(hydra, config_name, overrides, multirun)
        if problems:
            raise SdbatchError(f"Invalid command line: {'; '.join(problems)}. See python -m {program(config_name)} "
                               "--help.")
        for cfg in job_configs(hydra, config_name, overrides, multirun):
            problems += [problem for problem in problems_of(cfg) if problem not in problems]
        if problems:
            raise SdbatchError("Invalid settings: " + "; ".join(problems) + ".")
    except (HydraException, OmegaConfBaseException) as error:
        raise SdbatchError(hydra_message(error)) from None
    finally:
        GlobalHydra.instance().clear()


def make_hydra(config_dir: str | None):
    """A Hydra with the search path @hydra.main builds: Hydra's configs, plugins' (submitit), sdbatch/conf and
    --config-dir."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_automatic_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra

    search_path = create_automatic_config_search_path(None, None, str(CONF_DIR))
    if config_dir is not None:
        if not os.path.isdir(config_dir):
            raise SdbatchError(f"--config-dir {config_dir}: no such folder.")
        search_path.prepend("command-line", f"file://{os.path.abspath(config_dir)}", SearchPathQuery(provider="schema"))
    GlobalHydra.instance().clear()
    return Hydra.create_main_hydra2(task_name="sdbatch", config_search_path=search_path)


def parse(lines: list[str], loader) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create(config_loader=loader)  # the loader expands model=glob(*)
    try:
        return parser.parse_overrides(overrides=lines)
    except OverrideParseException as error:
        detail = str(error).splitlines()[1:2] or ["?"]
        raise SdbatchError(f"Invalid command line: {error.override}: Hydra cannot parse it ({detail[0].strip()}); "
                           "write key=value, and quote text with spaces or commas: key='a, b'.") from None


def groups(loader, parent: str = "") -> set[str]:
    """Every config group, nested ones as `hydra/launcher`."""
    found = set()
    for name in loader.list_groups(parent):
        path = f"{parent}/{name}" if parent else name
        found |= {path} | groups(loader, path)
    return found


def is_group(override, known_groups: set[str]) -> bool:
    return override.key_or_group in known_groups


def values(override) -> list[str]:
    """The value(s) of an override as text: each one of a sweep."""
    if override.is_sweep_override():
        return list(override.sweep_string_iterator())
    return [override.get_value_element_as_str()]


def override_problems(hydra, config_name: str, overrides: list, multirun: bool) -> list[str]:
    """Unknown group options and keys (with the close valid ones), `+`/`~` on sdbatch's settings, sweeps without -m."""
    loader = hydra.config_loader
    known_groups = groups(loader)
    problems, choices = [], []
    for override in overrides:
        line = override.input_line
        if override.is_sweep_override() and not multirun:
            problems.append(f"{line} lists several values, which sweeps over them and needs -m (--multirun); "
                            f"to pass text with a comma, quote it: {override.key_or_group}='...'")
        elif override.is_sweep_override() and override.is_hydra_override():
            problems.append(f"{line}: Hydra's own settings cannot be swept, only sdbatch's (worker_index=0,1,...)")
        if not is_group(override, known_groups):
            continue
        group = override.key_or_group
        if override.is_hydra_override():
            choices.append(line)  # hydra/launcher=...: Hydra's own group, composed below
            continue
        options = loader.get_group_options(group)
        if override.is_delete() or override.is_add() or override.is_force_add():
            problems.append(f"{line}: {group} is always chosen; write {group}=OPTION ({', '.join(options)})")
            continue
        wrong = [value for value in values(override) if value not in options]
        for value in wrong:
            close = difflib.get_close_matches(value, options, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            problems.append(f"{group}={value}: {group} has no option {value} ({hint}options: {', '.join(options)})")
        if not wrong:
            choices.append(f"{group}={values(override)[0]}")
    reference = hydra.compose_config(config_name, choices, run_mode=run_mode("RUN"), with_log_configuration=False)
    known = set(key_paths(OmegaConf.to_container(reference, resolve=False)))
    for override in overrides:
        if not is_group(override, known_groups):
            problems += key_problems(override, known, reference)
    return problems


def key_problems(override, known: set[str], reference) -> list[str]:
    line, key = override.input_line, override.key_or_group
    appended = override.is_add() or override.is_force_add()
    if override.is_hydra_override():
        return [] if key in known or appended else [unknown(line, key, known, reference)]
    if override.is_delete():
        return [f"{line}: sdbatch's settings cannot be removed; set {key}= to another value instead"]
    if key.startswith(TEXT_KEYS) and (appended or key in known):
        return []
    if key.startswith(TEXT_KEYS):
        return [f"{line}: scheduler={reference.scheduler.name} sets no {key.removeprefix(TEXT_KEYS)}; to pass a "
                f"new keyword argument to the scheduler class, write +{line}"]
    if key not in known:
        return [unknown(line, key, known, reference)]
    if override.is_add():
        return [f"{line}: {key} is already a setting; write {line[1:]} without the +"]
    return []


def unknown(line: str, key: str, known: set[str], reference) -> str:
    """`line: no setting KEY (did you mean ...?)`; inside a group, which of its options have the key."""
    head, _, rest = key.partition(".")
    if rest and head != "hydra" and head in reference and (CONF_DIR / head).is_dir():
        owners = [option for option, _, keys in group_options(head) if rest in keys]
        chosen = f"{head}={reference[head].get('name', '?')}"
        if owners:
            return f"{line}: {chosen} has no setting {rest}; {head}={' or '.join(owners)} has it"
        pool = [k for k in known if k.startswith(f"{head}.")]
        return f"{line}: {chosen} has no setting {rest}{did_you_mean(key, pool)}"
    pool = [k for k in known if k.startswith("hydra.") == key.startswith("hydra.")]
    what = "a Hydra" if key.startswith("hydra.") else "an sdbatch"
    return f"{line}: {key} is not {what} setting{did_you_mean(key, pool)}"


def did_you_mean(key: str, pool: list[str]) -> str:
    close = difflib.get_close_matches(key, [k for k in pool if not key.startswith(f"{k}.")], n=2, cutoff=0.7)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def key_paths(node, prefix: str = ""):
    """Every dotted key of a nested dict, inner nodes included."""
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}{key}"
            yield path
            yield from key_paths(value, f"{path}.")


def job_configs(hydra, config_name: str, overrides: list, multirun: bool):
    """The config of every job Hydra will run (one without -m), without the hydra node, as the job receives it."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    loader = hydra.config_loader
    known_groups = groups(loader)
    hydra_lines = [o.input_line for o in overrides if o.is_hydra_override()]
    task = [o for o in overrides if not o.is_hydra_override()]
    jobs = BasicSweeper.split_arguments(task, None)[0] if multirun else [[o.input_line for o in task]]
    bases, parsed_lines = {}, {}
    for job in jobs:
        for line in job:
            if line not in parsed_lines:  # a sweep of N values has N distinct lines, not N x jobs
                parsed_lines[line] = parse([line], loader)[0]
        parsed = [parsed_lines[line] for line in job]
        choices = tuple(o.input_line for o in parsed if is_group(o, known_groups))
        if choices not in bases:  # compose once per choice of groups; the values are set on a copy
            base = hydra.compose_config(config_name, hydra_lines + list(choices), run_mode=run_mode("RUN"),
                                        with_log_configuration=False)
            with open_dict(base):
                del base["hydra"]
            bases[choices] = base
        cfg = copy.deepcopy(bases[choices])
        for override in parsed:
            if not is_group(override, known_groups):
                set_value(cfg, override)
        yield cfg


def set_value(cfg, override) -> None:
    """Apply a key=value override as Hydra does; a key only some options of a swept group have is named."""
    force = override.is_add() or override.is_force_add()
    try:
        OmegaConf.update(cfg, override.key_or_group, override.value(), merge=True, force_add=force)
    except OmegaConfBaseException:
        known = set(key_paths(OmegaConf.to_container(cfg, resolve=False)))
        raise SdbatchError(f"Invalid command line: {unknown(override.input_line, override.key_or_group, known, cfg)}"
                           ".") from None


def run_mode(name: str):
    from hydra.types import RunMode
    return RunMode[name]


def hydra_message(error: Exception) -> str:
    """Hydra's message as one paragraph, without its advice to append keys with +."""
    text = str(error)
    if "submitit" in text and "hydra/launcher" in text:
        return ("hydra/launcher=slurm needs the hydra-submitit-launcher plugin: pip install 'sdbatch[slurm]' "
                "(or submit with scripts/slurm/sdbatch.sbatch).")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not re.match(r"(To append to your config|Either remove \+|Or add a second \+)",
                                                      line)]
    return " ".join(lines).replace(":.", ":") or type(error).__name__


# ---------------------------------------------------------------- --help
def program(config_name: str) -> str:
    return "sdbatch" if config_name == "config" else f"sdbatch.{config_name}"


def read_config(config_name: str) -> tuple[list[str], list[tuple], list[tuple]]:
    """(header comment lines, [(key, default, meaning)], [(group, default option, meaning)]) of a shipped yaml:
    its comments are the one description of each setting, for --help and the README alike."""
    text = (CONF_DIR / f"{config_name}.yaml").read_text(encoding="utf-8")
    header = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header.append(line[2:] if line.startswith("# ") else line[1:])
    key_lines = re.finditer(r"^(\w+):[ \t]+(.*?)[ \t]+#[ \t]*(.*)$", text, re.M)
    keys = [(m[1], m[2].strip(), m[3].strip()) for m in key_lines]
    group_lines = re.finditer(r"^[ \t]+-[ \t]+(\w+):[ \t]+(\S+)[ \t]+#[ \t]*(.*)$", text, re.M)
    return header, keys, [(m[1], m[2], m[3].strip()) for m in group_lines]


def group_options(group: str) -> list[tuple[str, str, dict]]:
    """[(option, its header comment, {key: comment})] for each yaml of a group folder."""
    options = []
    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        lines = path.read_text(encoding="utf-8").splitlines()
        about = lines[0].lstrip("# ").strip() if lines and lines[0].startswith("#") else ""
        keys = {m[1]: m[2].strip() for m in map(re.compile(r"^(\w+):.*?[ \t]#[ \t]*(.*)$").match, lines) if m}
        options.append((path.stem, about, keys))
    return options


def help_text(config_name: str) -> str:
    header, keys, groups_ = read_config(config_name)
    width = max(80, min(shutil.get_terminal_size((100, 24)).columns, 120))
    out = [*header, "", "settings (key=value: default, then meaning):"]
    out += table([(key, shown_default(default), meaning) for key, default, meaning in keys], width)
    if groups_:
        out += ["", "config groups (group=option; * marks the default):"]
    for group, default, meaning in groups_:
        options = group_options(group)
        rows = [(("* " if option == default else "  ") + option, about) for option, about, _ in options]
        out += ["", f"  {group}: {meaning}", *table(rows + group_keys(group, options), width, indent=4)]
    footer = "Hydra: --cfg job prints the composed config; --hydra-help tells Hydra's own options."
    if groups_:
        footer = ("Hydra: -m (--multirun) runs one job per value of a comma-separated list (worker_index=0,1,2,3), "
                  "through hydra/launcher=slurm on a Slurm cluster; " + footer.removeprefix("Hydra: "))
    return "\n".join(out + [""] + textwrap.wrap(footer, width))


def table(rows: list[tuple], width: int, indent: int = 2) -> list[str]:
    """Aligned columns; the last one wrapped to the width."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for *cells, last in rows:
        lead = " " * indent + "".join(f"{cell:<{w}}  " for cell, w in zip(cells, widths))
        lines += textwrap.wrap(last, width, initial_indent=lead, subsequent_indent=" " * len(lead),
                               break_on_hyphens=False) or [lead.rstrip()]
    return lines


def group_keys(group: str, options: list) -> list[tuple[str, str]]:
    """(`  group.key`, meaning) for each key of the group's options but `name`, with the options that have it if
    not all."""
    seen = {}
    for option, _, keys in options:
        for key, meaning in keys.items():
            seen.setdefault(key, (meaning, []))[1].append(option)
    return [(f"  {group}.{key}", ("" if len(owners) == len(options) else f"({', '.join(owners)}) ") + meaning)
            for key, (meaning, owners) in seen.items() if key != "name"]


def shown_default(default: str) -> str:
    return "(required)" if default == "???" else default
