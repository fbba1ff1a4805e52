"""The README against the code it describes: flag tables against each command's options (both ways, with their
defaults), the demo's paragraph, the on/off flags it lists and the Layout block. Text only, no runs: fast."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from twa_tool.cli import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# a default column's words for "no value" (None, (), False): "torch's" for --threads, "auto" for --strip-prefix...
EMPTY_WORDS = {"", "none", "all", "auto", "from metadata", "torch's", "offline", "off"}


def section(heading: str) -> str:
    """The README's text from the ``## heading`` line to the next ``## `` heading."""
    start = README.index(f"\n## {heading}")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else None]


def option_table(heading: str) -> list[list[str]]:
    """The cells of the first ``| option | default | meaning |`` table of a section (``\\|`` inside a cell kept)."""
    lines = section(heading).splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("| option |"))
    rows = []
    for line in lines[first + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def flags_in(text: str) -> list[str]:
    """Every ``-x`` / ``--name`` written inside backticks in ``text``, in order."""
    return [flag for span in re.findall(r"`([^`]+)`", text)
            for flag in re.findall(r"(?<![\w-])(-{1,2}[a-z](?:[\w-]*\w)?)(?![\w-])", span)]


def options(command: str) -> dict[str, click.Option]:
    """Each spelling (``-q``, ``--quiet``, ``--no-quiet``) of a visible option of ``twa command`` -> the option."""
    found = {}
    for param in cli.commands[command].params:
        if isinstance(param, click.Option) and not param.hidden:
            found |= {opt: param for opt in [*param.opts, *param.secondary_opts]}
    return found


def option_params(command: str) -> list[click.Option]:
    return list({id(p): p for p in options(command).values()}.values())


def default_matches(param: click.Option, text: str) -> bool:
    """Whether a README default cell's word (backticks stripped) states ``param``'s default."""
    text = text.strip().strip("`")
    if param.required:
        return text == "required"
    if param.multiple or param.default is None or param.default is False:
        return text in EMPTY_WORDS
    if isinstance(param.default, bool | str | Path):
        return text == str(param.default)
    try:
        return float(text) == float(param.default)
    except ValueError:
        return False


TABLES = [("average", "`twa average`"), ("soup", "`twa soup`")]


@pytest.mark.parametrize("command, heading", TABLES)
def test_the_readme_option_table_lists_every_option_and_only_real_ones(command: str, heading: str) -> None:
    """Every visible option of the command is in the first column of its README table, and every flag the table
    names (in any column) is one of the command's."""
    known = options(command)
    rows = option_table(heading)
    named = [flag for row in rows for flag in flags_in(" ".join(row))]
    assert not sorted(set(named) - set(known)), f"README's {command} table names flags the command lacks"
    # in the first column, or in the meaning of the positional argument's row (soup's --include/--exclude)
    listed = {id(known[flag]) for row in rows for flag in flags_in(row[0] if flags_in(row[0]) else row[2])
              if flag in known}
    missing = [p.opts[-1] for p in option_params(command) if id(p) not in listed and p.name != "help"]
    assert not missing, f"options of twa {command} missing from the README's table: {missing}"


@pytest.mark.parametrize("command, heading", TABLES)
def test_the_readme_option_table_gives_the_defaults_of_the_code(command: str, heading: str) -> None:
    """The default column: one value per flag of its row, in order (or one value for the row's first flag, or the
    same word for a row of on/off flags), each the option's default; an empty cell says nothing."""
    known = options(command)
    wrong = []
    for row in option_table(heading):
        params = list({id(known[f]): known[f] for f in flags_in(row[0]) if f in known}.values())
        if not params or not row[1]:
            continue
        values = re.split(r",\s+", row[1])
        if len(values) == 1 and not all(p.is_flag for p in params):
            params = params[:1]
        elif len(values) == 1:
            values = values * len(params)
        assert len(values) == len(params), f"{row[0]}: {len(values)} defaults for {len(params)} options"
        wrong += [f"{p.opts[-1]}: README {v!r}, code {p.default!r}" for p, v in zip(params, values)
                  if not default_matches(p, v)]
    assert not wrong, wrong


def test_the_readme_demo_paragraph_lists_every_demo_option_with_its_default() -> None:
    """`twa demo`'s options are listed in prose under Quick start: every one of them, none it lacks, and the
    defaults it gives in parentheses."""
    start = README.index("`twa demo` trains")
    text = README[start:README.index("\n## ", start)]
    known = options("demo")
    named = set(flags_in(text))
    assert not sorted(named - set(known)), "the demo paragraph names flags twa demo lacks"
    missing = [p.opts[-1] for p in option_params("demo")
               if p.name != "help" and not set(p.opts) & named]
    assert not missing, f"options of twa demo missing from the README's paragraph: {missing}"
    stated = {}  # "`--train-epochs` (8)", "`--epochs` (TWA epochs, 4)", "`--out DIR` (default `runs/demo`)"
    for flag, note in re.findall(r"`(--[\w-]+)[^`]*`\s+\(([^()]*)\)", text):
        value = note.split(",")[-1].strip().removeprefix("default ").strip("`")
        if " " not in value:
            stated[flag] = value
    assert {"--out", "--train-epochs", "--epochs", "--lr"} <= set(stated), stated
    wrong = {flag: value for flag, value in stated.items() if not default_matches(known[flag], value)}
    assert not wrong, wrong


def test_the_readme_lists_exactly_the_no_forms_of_the_on_off_flags() -> None:
    """'Every on/off flag has a --no- form ...: --no-json, ...': the list is all of them, on every command."""
    line = re.search(r"Every on/off flag has a `--no-` form[^\n]*\n([^\n]*)", README)
    assert line, "the sentence listing the --no- forms moved"
    listed = set(re.findall(r"`(--no-[\w-]+)`", line.group(1)))
    code = {opt for command in cli.commands for opt in options(command) if opt.startswith("--no-")}
    assert listed == code


def test_the_readme_inspect_section_points_to_the_selection_flags_of_average() -> None:
    """`twa inspect` has no table: the README says it takes `twa average`'s selection flags, so every inspect
    option must be one twa average has."""
    assert not sorted(set(options("inspect")) - set(options("average")))


def test_the_readme_layout_block_lists_every_module() -> None:
    """The ``## Layout`` block names each module of twa_tool/ (``__main__.py`` in entry.py's line), and only
    those."""
    block = section("Layout")
    listed = set(re.findall(r"^  (\w+)\.py", block, re.MULTILINE)) | set(re.findall(r"\((\w+)\.py\)", block))
    modules = {p.stem for p in (ROOT / "twa_tool").glob("*.py")} - {"__init__"}
    assert listed == modules


DOCUMENTS = [ROOT / "README.md", ROOT / "docs" / "report.md", *sorted((ROOT / "examples").rglob("*.md")),
             *sorted((ROOT / "examples").rglob("*.sh")), *sorted((ROOT / "examples").rglob("*.yml")),
             *sorted((ROOT / "benchmarks").glob("*.sh"))]
COMMAND = re.compile(r"(?:(?<![\w./-])twa|-m(?: --)? twa_tool)\s+(average|soup|inspect|demo)\b([^`#>|;\n]*)")


def test_every_flag_of_a_documented_twa_command_exists() -> None:
    """Each `twa CMD ...` (or `-m twa_tool CMD ...`) in the README, docs, examples' READMEs, results and scripts,
    in code blocks or inline, with its continuation lines: every flag it passes is one of that command's."""
    seen, wrong = 0, []
    for path in DOCUMENTS:
        text = re.sub(r"\\\n\s*", " ", path.read_text())
        text = re.sub(r"(?<!`)`([^`\n]+)\n([^`\n]+)`(?!`)", r"`\1 \2`", text)  # an inline span wrapped in two
        for match in COMMAND.finditer(text):
            command, rest = match.groups()
            flags = re.findall(r"(?<![\w$-])(--?[a-zA-Z][\w-]*)", rest)
            seen += len(flags)
            wrong += [f"{path.relative_to(ROOT)}: twa {command} {flag}" for flag in flags
                      if flag not in options(command) and flag not in ("-h", "--help")]
    assert seen > 50, seen  # the pattern still finds the commands
    assert not wrong, wrong


def backticked(text: str) -> list[str]:
    """The ``code`` spans of ``text``, in order."""
    return re.findall(r"`([^`]+)`", text)


def test_the_readme_word_and_key_lists_are_the_ones_the_code_matches() -> None:
    """Lists the README spells out word by word, each against the constant the code matches with: the names that
    say a file is the newest save (and those that say it is not), the container keys of a torch file (raw and EMA),
    the words of a top-level key that names averaged weights, the prefixes always stripped. A word added to the
    code and not to the README (``average`` among the averaged-key words) made the README's list wrong."""
    from twa_tool import checkpoints, selection

    newest = re.search(r"the words\s+((?:`\w+`(?:, | or )?)+) without ((?:`\w+`(?:,\s+)?)+)", README)
    assert newest, "the sentence listing the newest-save words moved"
    assert set(backticked(newest.group(1))) == selection.NEWEST_WORDS
    assert set(backticked(newest.group(2))) == selection.NOT_NEWEST_WORDS

    row = next(r for r in README.splitlines() if r.startswith("| plain PyTorch |"))
    raw = re.search(r"or one under ((?:`\w+`(?:, )?)+)", row)
    ema = re.search(r"\(EMA keys ((?:`\w+`(?:, )?)+), else\)", row)
    averaged = re.search(r"under a key naming ((?:`\w+`/?)+)", row)
    prefixes = re.search(r"DDP `([^`]+)` and `torch.compile` `([^`]+)` prefixes always stripped", row)
    assert raw and ema and averaged and prefixes, "the plain PyTorch row of Inputs changed its wording"
    assert tuple(backticked(raw.group(1))) == checkpoints.CONTAINER_KEYS
    assert tuple(backticked(ema.group(1))) == checkpoints.EMA_CONTAINER_KEYS
    assert set(backticked(averaged.group(1))) == checkpoints._AVERAGED_WORDS
    assert prefixes.groups() == checkpoints.WRAPPER_PREFIXES

    ignored = re.search(r"Optimizer, scheduler, gradient-scaler and RNG files \(([^)]*)\) and `training_args.bin` are "
                        r"ignored and never unpickled", README)
    assert ignored, "the sentence naming the files that are never unpickled moved"
    names = [*backticked(ignored.group(1)), "training_args.bin"]
    assert all(checkpoints.NON_WEIGHT_STEMS.match(checkpoints._strip_suffix(n.replace("*", "_0"))) for n in names)


MARKDOWN = [ROOT / "README.md", ROOT / "docs" / "report.md", *sorted((ROOT / "examples").rglob("*.md"))]


def anchors(text: str) -> set[str]:
    """GitHub's anchors of a markdown file's headings: lower case, punctuation dropped, spaces as dashes."""
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.*)$", text, re.MULTILINE)}


def test_every_link_and_repository_path_in_the_documents_exists() -> None:
    """Relative links (``[x](examples/soup/RESULTS.md)``, ``[x](#use-in-ci)``) lead to a file and heading that
    exist, and every repository path in backticks (``benchmarks/gpu_check.sh``, ``examples/fashion_mnist/model.py:cnn``)
    names a file or folder there is: a renamed heading or moved script breaks no reader's link."""
    wrong = []
    for doc in MARKDOWN:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"\w+://", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path) if path else doc
            if not dest.exists() or (anchor and anchor not in anchors(dest.read_text())):
                wrong.append(f"{doc.relative_to(ROOT)}: link {target}")
        for span in re.findall(r"`([^`\n]+)`", text):
            for path in re.findall(r"(?<![\w/.-])((?:examples|benchmarks|tests|twa_tool|docs|\.ci)/[\w./*-]*\w)", span):
                if "*" not in path and not (ROOT / path).exists():
                    wrong.append(f"{doc.relative_to(ROOT)}: path {path}")
    assert not wrong, wrong


SCRIPT = re.compile(r"(?<![\w/.-])((?:[\w]+/)*\w+\.py)((?:[ \t]+[^\s`|;>]+)*)")
SCRIPTS = [*sorted((ROOT / "examples").rglob("*.py")), *sorted((ROOT / "benchmarks").glob("*.py"))]


def script_named(name: str) -> Path | None:
    """The repository script a command names: its path, or a basename only one script has (``basis_bench.py``)."""
    if (ROOT / name).is_file() and ROOT / name in SCRIPTS:
        return ROOT / name
    found = [p for p in SCRIPTS if p.name == name]
    return found[0] if len(found) == 1 else None


def test_every_flag_of_a_documented_script_command_exists() -> None:
    """`python benchmarks/basis_bench.py --k 50 100 --repeat 3`, `basis_bench.py --step-only --k 100`,
    `python examples/fashion_mnist/train.py --out ...`: each flag a document or script passes to one of the
    repository's scripts is one its argument parser defines (the README's measurements name the command that produced
    them)."""
    seen, wrong = 0, []
    for doc in [*MARKDOWN, *sorted((ROOT / "examples").rglob("*.sh")), *sorted((ROOT / "benchmarks").glob("*.sh"))]:
        text = re.sub(r"\\\n\s*", " ", doc.read_text())  # a shell line's continuations
        text = re.sub(r"(?<!`)`([^`\n]+)\n([^`\n]+)`(?!`)", r"`\1 \2`", text)  # an inline span wrapped in two
        for name, rest in SCRIPT.findall(text):
            if (script := script_named(name)) is None:
                continue
            defined = set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", script.read_text()))
            flags = re.findall(r"(?<![\w$-])(--[a-zA-Z][\w-]*)", rest)
            seen += len(flags)
            wrong += [f"{doc.relative_to(ROOT)}: {name} {flag}" for flag in flags if flag not in defined]
    assert seen > 15, seen  # the pattern still finds the commands
    assert not wrong, wrong


def test_the_readme_names_every_built_in_dataset_and_model() -> None:
    """The `--data SPEC` row lists the registry's dataset names and the `--model SPEC` row the built-in models and
    spec prefixes, as `twa average --help` and the errors do."""
    from twa_tool.data import list_data_names
    from twa_tool.models import BUILTIN_MODELS, MODEL_FACTORIES

    rows = {row[0]: row[2] for row in option_table("`twa average`")}
    data = rows["`--data SPEC`"].split(", or `module:function`")[0]
    while re.search(r"\([^()]*\)", data):  # the notes in parentheses, nested ones too
        data = re.sub(r"\([^()]*\)", "", data)
    data = [name for name in backticked(data) if ":" not in name]
    assert data == list_data_names()
    model = rows["`--model SPEC`, `--model-arg KEY=VALUE`"].split(" (the small built-in models)")[0]
    names = backticked(model)
    assert [n for n in names if n.startswith("twa:")] == [f"twa:{name}" for name in BUILTIN_MODELS]
    assert {n.split(":")[0] for n in names if n.endswith(":NAME") or n.startswith("twa:")} == set(MODEL_FACTORIES)


def test_the_quick_start_is_what_ci_runs_and_what_pyproject_declares() -> None:
    """The Quick start's install and test commands are the ones .ci/run runs on a fresh clone, its extra exists,
    and the Python floor and dependencies it names are pyproject.toml's."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: pytest brings tomli
        import tomli as tomllib

    block = re.search(r"## Quick start\n\n```bash\n(.*?)```", README, re.DOTALL)
    assert block, "the Quick start's code block moved"
    lines = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    install, demo, tests = lines
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert install in ci and tests in ci and demo == "twa demo"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extra = re.fullmatch(r'pip install -e "\.\[(\w+)\]"', install)
    assert extra and extra.group(1) in project["optional-dependencies"]
    comment = re.search(r"# install \(Python >= ([\d.]+); ([^)]*)\)", block.group(1))
    assert comment and project["requires-python"] == f">={comment.group(1)}"
    assert comment.group(2).split(", ") == [re.match(r"[\w-]+", r).group(0) for r in project["dependencies"]]
