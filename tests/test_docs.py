"""The docs stay true: every command in a fenced code block of README.md and docs/*.md names
things that exist (a `ddetr` command and its options, parsed by the command's own parser; a
`python -m` module and its options; `ray` subcommands, parsed by Ray's CLI; repository files),
every `section.key=value` (in commands, in SLURM's DDETR_OVERRIDES, in prose code spans,
in sweep-file examples) names a key of the config tree, the relative links lead to files,
and docs/configuration-reference.md is what tools/config_reference.py writes.

The commands are read as a shell would: `\\` continues a line, `# ...` is a comment, leading
`VAR=value` words set the environment, `;`/`&&`/`|` separate commands. Placeholders such as
`<run dir>` or `<submission id>` stand for one word; `$VARS` are kept as written. CPU only, no
network, nothing is run.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import io
import re
import shlex
import subprocess
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import yaml

from cluster.deploy_checks import SEPARATORS, CommandChecker, check_python_snippet, module_exists
from ddetr_dist.cli import COMMANDS, build_parser
from ddetr_dist.config import Config, ConfigError, config_from_dict, did_you_mean, load_config

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
SHELL_LANGS = {"bash", "sh", "shell", "console"}
KNOWN_LANGS = SHELL_LANGS | {"yaml", "python", "text", "json"}
PLACEHOLDER = "PLACEHOLDER"  # what `<run dir>` becomes: one word, a plain string value
# where the Ray cluster launcher configs put this checkout on every node (docs/clusters.md)
LAUNCHER_ROOT = "/home/ray/ddetr_dist"
# a config override, as the commands tell one from other positional items (config.is_override)
OVERRIDE = re.compile(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)=(.*)", re.S)
ENV_ASSIGNMENT = re.compile(r"[A-Za-z_]\w*=")
FILE_SUFFIXES = {"py", "yaml", "yml", "json", "jsonl", "md", "sh", "sbatch", "txt", "pth", "pt", "png", "log", "csv"}
# wrong on purpose: a page showing the error a misspelled key gets (docs/tune.md)
MISSPELLED_ON_PURPOSE = {"optim.lrr"}
# `python -m MODULE` whose parser is built in another module's main() (ops/__main__.py runs build.main)
PYTHON_MAINS = {"ddetr_dist.ops": "ddetr_dist.ops.build"}


# ------------------------------------------------------------------ reading the pages


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    blocks, current, lines = [], None, []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fence = re.match(r"^\s*```(.*)$", line)
        if current is None and fence:
            current, lines = Block(path, number, fence.group(1).strip(), ""), []
        elif current is not None and fence and not fence.group(1).strip():
            current.text = "\n".join(lines) + "\n"
            blocks.append(current)
            current = None
        elif current is not None:
            lines.append(line)
    assert current is None, f"{path.relative_to(REPO)}:{current.line}: a code fence is never closed"
    return blocks


def prose(path: Path) -> str:
    """The page without its fenced blocks."""
    return re.sub(r"^\s*```.*?^\s*```[ \t]*$", "", path.read_text(), flags=re.S | re.M)


def command_lines(text: str) -> list[str]:
    """Shell text -> its logical lines: continuations joined, placeholders made one word,
    comments dropped (by the lexer, which treats `#` at a word's start as the shell does)."""
    text = re.sub(r"\\\n", " ", text)
    text = re.sub(r"<[A-Za-z][^<>\n]*>", PLACEHOLDER, text)  # <run dir>, <head>:6379; not `>/dev/null`
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def split_commands(line: str) -> list[tuple[dict[str, str], list[str]]]:
    """One shell line -> its simple commands as (leading VAR=value environment, words), split at
    ; && || | and braces, redirections dropped, `sudo` dropped (deploy_checks.simple_commands,
    keeping the environment)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, words, skip_next = [], [], False
    for token in lexer:
        if skip_next:
            skip_next = False
        elif token in SEPARATORS:
            commands.append(words)
            words = []
        elif set(token) <= set("<>&"):  # a redirection and its target
            skip_next = True
        else:
            words.append(token)
    commands.append(words)
    out = []
    for words in commands:
        env = {}
        while words and (words[0] == "sudo" or ENV_ASSIGNMENT.match(words[0])):
            if words[0] != "sudo":
                key, value = words[0].split("=", 1)
                env[key] = value
            words = words[1:]
        if words:
            out.append((env, words))
    return out


# ------------------------------------------------------------------ the config tree


def config_sections() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])}


def check_key(dotted: str, where: str) -> None:
    """`dotted` names a leaf of the config tree (raise AssertionError with the nearest key)."""
    cls, parts = Config, dotted.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        here = ".".join(parts[:i])
        assert part in names, (f"{where}: '{dotted}' is not a config key: no '{part}' in "
                               f"{here or 'the top level'}.{did_you_mean(part, names)}")
        cls = hints[part]
        is_section = dataclasses.is_dataclass(cls)
        assert is_section == (i < len(parts) - 1), f"{where}: '{dotted}' is a section, not a key"


def check_overrides(config: Path | None, overrides: list[str], where: str) -> None:
    """Each override names a config key; those without placeholders also load (types checked),
    on top of the config file when it is one of the repository's."""
    loadable = []
    for text in overrides:
        key, value = OVERRIDE.fullmatch(text).groups()
        check_key(key, f"{where}: {text}")
        if PLACEHOLDER not in value and "$" not in value:
            loadable.append(text)
    try:
        load_config(config, loadable)
    except ConfigError as e:
        raise AssertionError(f"{where}: {e}") from None


def dotted_key_mentions(text: str) -> list[str]:
    """`section.key` and `section.key=value` in code spans of prose (not `train.py`)."""
    sections = "|".join(config_sections())
    found = []
    for span in re.findall(r"`([^`\n]+)`", text):
        for piece in span.split():
            match = re.fullmatch(rf"((?:{sections})\.([A-Za-z_]\w*))(=.*)?", piece.strip(",;:()"))
            if match and match.group(2) not in FILE_SUFFIXES:
                found.append(match.group(1))
    return found


# ------------------------------------------------------------------ the command checker


class Parsed(Exception):
    """Raised by a patched parse_args with what it parsed: a module's main() stops there."""

    def __init__(self, namespace: argparse.Namespace):
        super().__init__()
        self.namespace = namespace


def parse_with(parser: argparse.ArgumentParser, args: list[str], where: str, intermixed: bool = True):
    """argparse's result, or AssertionError with its message (never SystemExit)."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            try:  # as ddetr_dist.cli.main parses: options may come after positional overrides
                return parser.parse_intermixed_args(args) if intermixed else parser.parse_args(args)
            except TypeError:  # argparse.REMAINDER cannot be intermixed (ddetr bench)
                return parser.parse_args(args)
    except SystemExit:
        *usage, error = stderr.getvalue().strip().splitlines() or [""]
        raise AssertionError(f"{where}: {error}\n" + "\n".join(usage)) from None


def parse_main(module_name: str, args: list[str], where: str) -> argparse.Namespace:
    """Parse `args` with the parser that `module_name`'s main() builds, without running it."""
    module = importlib.import_module(module_name)
    assert hasattr(module, "main"), f"{where}: {module_name} has no main() to read its options from"
    real = argparse.ArgumentParser.parse_args

    def parse_and_stop(parser, argv=None, namespace=None):
        argparse.ArgumentParser.parse_args = real  # parse_with parses for real
        raise Parsed(parse_with(parser, list(argv if argv is not None else args), where, intermixed=False))

    argparse.ArgumentParser.parse_args = parse_and_stop
    try:
        module.main(args)
    except Parsed as parsed:
        return parsed.namespace
    finally:
        argparse.ArgumentParser.parse_args = real
    raise AssertionError(f"{where}: {module_name}.main() did not parse its arguments")


class DocsChecker(CommandChecker):
    """deploy_checks' checker for commands typed in the repository root (or, on a launcher
    node, in its copy at LAUNCHER_ROOT): files of a checkout must exist, what running makes
    (runs/, data/, weights/) need not; every ddetr command is parsed by its own parser."""

    def __init__(self, tracked_top: set[str]):
        super().__init__(LAUNCHER_ROOT)
        self.tracked_top = tracked_top
        self.where = ""

    def repo_path(self, word: str, cwd_in_repo: bool) -> Path | None:
        path = super().repo_path(word, cwd_in_repo)
        if path is not None and path.parts and path.parts[0] not in self.tracked_top:
            return None  # e.g. data/demo, runs/demo-...: made by running, not in a checkout
        return path

    def check(self, text: str, cwd_in_repo: bool = True):
        for line in command_lines(text):
            for env, words in split_commands(line):
                self.check_command(env, words, line, cwd_in_repo)
        return self.checked

    def check_command(self, env: dict[str, str], words: list[str], line: str, cwd_in_repo: bool) -> None:
        where = f"{self.where}: {line.strip()!r}"
        self.check_repo_files(words, cwd_in_repo, where)
        program, args = Path(words[0]).name, words[1:]
        if program == "ddetr":
            self.check_ddetr(args, where, cwd_in_repo)
        elif program == "submit.sh":  # launch/submit.sh [--no-wait] ARGS: `python -m ddetr_dist.train ARGS`
            self.check_ddetr(["train"] + args[args[:1] == ["--no-wait"]:], where, cwd_in_repo)
        elif program == "sbatch" and any(Path(w).name == "ddetr.sbatch" for w in args):
            self.check_sbatch(env, where, cwd_in_repo)
        elif re.match(r"python(3(\.\d+)?)?$", program):
            self.check_python(args, where, cwd_in_repo)
        elif program == "ray":
            self.check_ray(args, where)

    def config_file(self, name: str | None, cwd_in_repo: bool) -> Path | None:
        """The repository config file `name` means, or None (a file of the user's: tiny.yaml)."""
        if not name:
            return None
        path = self.repo_path(name, cwd_in_repo)
        return REPO / path if path is not None else None

    def check_sbatch(self, env: dict[str, str], where: str, cwd_in_repo: bool) -> None:
        """launch/slurm/ddetr.sbatch trains DDETR_CONFIG with DDETR_OVERRIDES."""
        overrides = env.get("DDETR_OVERRIDES", "").split()
        for text in overrides:
            assert OVERRIDE.fullmatch(text), f"{where}: DDETR_OVERRIDES item {text!r} is not section.key=value"
        check_overrides(self.config_file(env.get("DDETR_CONFIG"), cwd_in_repo), overrides, where)

    def check_ddetr(self, args: list[str], where: str, cwd_in_repo: bool = True) -> None:
        if args[:1] in (["-h"], ["--help"], ["-V"], ["--version"]):
            return
        name = args[0] if args else ""
        assert name in COMMANDS, f"{where}: `ddetr {name}` is not a command.{did_you_mean(name, COMMANDS)}"
        self.checked.ddetr_commands.append(args)
        name, rest = args[0], args[1:]
        parser, module = build_parser(name)
        if "-h" in rest or "--help" in rest:
            return
        namespace = parse_with(parser, rest, where)
        if name == "bench":  # the target's own options (ddetr_dist.bench.run)
            target = importlib.import_module(module.TARGETS[namespace.target])
            sub = argparse.ArgumentParser(prog=f"ddetr bench {namespace.target}")
            target.add_arguments(sub)
            self.check_config_args(parse_with(sub, namespace.options, where, intermixed=False),
                                   namespace.options, where, cwd_in_repo)
            return
        self.check_config_args(namespace, rest, where, cwd_in_repo)

    def check_config_args(self, namespace, words: list[str], where: str, cwd_in_repo: bool) -> None:
        """The overrides (wherever the parser put them) name config keys and load on --config."""
        overrides = list(getattr(namespace, "overrides", None) or []) + list(getattr(namespace, "override", None) or [])
        overrides += [w for w in words if OVERRIDE.fullmatch(w) and w not in overrides]  # predict: among its items
        for text in overrides:
            assert OVERRIDE.fullmatch(text), f"{where}: {text!r} is not a section.key=value override"
        if overrides or getattr(namespace, "config", None):
            check_overrides(self.config_file(getattr(namespace, "config", None), cwd_in_repo), overrides, where)

    def check_ray(self, args: list[str], text: str) -> None:
        """deploy_checks' check, and no group left without its subcommand (`ray job logz`)."""
        from ray.scripts.scripts import cli

        command, rest = cli, list(args)
        while isinstance(command, click.Group) and rest and rest[0] in command.commands:
            command, rest = command.commands[rest[0]], rest[1:]
        assert not isinstance(command, click.Group), f"{text}: `ray {' '.join(args[:2])}` is not a ray command"
        super().check_ray(args, text)

    def check_python(self, args: list[str], where: str, cwd_in_repo: bool = True) -> None:
        if "-c" in args:
            check_python_snippet(args[args.index("-c") + 1], where)
            return
        if "-m" not in args:
            return
        i = args.index("-m")
        module, rest = args[i + 1], args[i + 2:]
        assert module_exists(module), f"{where}: no module {module}"
        if not module.startswith("ddetr_dist"):
            return
        if module == "ddetr_dist.cli":
            self.check_ddetr(rest, where, cwd_in_repo)
            return
        commands = {mod: name for name, (mod, _) in COMMANDS.items()}
        if module in commands:  # python -m ddetr_dist.train ARGS == ddetr train ARGS
            self.check_ddetr([commands[module]] + rest, where, cwd_in_repo)
        elif "-h" not in rest and "--help" not in rest:
            namespace = parse_main(PYTHON_MAINS.get(module, module), rest, where)
            self.check_config_args(namespace, rest, where, cwd_in_repo)


def tracked_top_level() -> set[str]:
    """The top-level names a fresh checkout has (git's tracked and untracked-not-ignored files)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                            cwd=REPO, capture_output=True)
    if listed.returncode != 0:  # not a git checkout: what is here, without what running makes
        return {p.name for p in REPO.iterdir()} - {"data", "runs", "weights", "build", ".venv"}
    return {name.split("/")[0] for name in listed.stdout.decode().split("\0") if name}


@pytest.fixture(scope="module")
def checker():
    return DocsChecker(tracked_top_level())


def check_shell_text(checker: DocsChecker, text: str, where: str = "test") -> None:
    checker.where = where
    checker.check(text)


def check_block(checker: DocsChecker, block: Block) -> None:
    if block.lang in SHELL_LANGS:
        check_shell_text(checker, block.text, block.where)
    elif block.lang == "python":
        check_python_snippet(block.text, block.where)
    elif block.lang == "yaml":
        check_yaml_block(block.text, block.where)


def check_yaml_block(text: str, where: str) -> None:
    """A sweep file's `space` and `points_to_evaluate` keys, or a config's sections."""
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        return
    if "space" in data:
        for key in data["space"]:
            check_key(key, f"{where}: space")
        for point in (data.get("search") or {}).get("points_to_evaluate", []):
            for key in point:
                check_key(key, f"{where}: points_to_evaluate")
    elif set(data) & set(config_sections()):
        try:
            config_from_dict({k: v for k, v in data.items() if k != "base"})
        except ConfigError as e:
            raise AssertionError(f"{where}: {e}") from None


# ------------------------------------------------------------------ the tests

BLOCKS = [block for path in DOCS for block in fenced_blocks(path)]


def test_the_pages_are_found():
    names = {p.relative_to(REPO).as_posix() for p in DOCS}
    assert {"README.md", "docs/training.md", "docs/clusters.md", "docs/configuration-reference.md"} <= names
    assert any("ddetr train" in b.text for b in BLOCKS)


def test_the_readme_starts_with_make_demo_and_make_test():
    first = fenced_blocks(REPO / "README.md")[0]
    commands = [line.split("#")[0].split() for line in command_lines(first.text)]
    assert commands[:2] == [["make", "demo"], ["make", "test"]], first.text


def test_every_code_block_says_its_language():
    unnamed = [b.where for b in BLOCKS if b.lang not in KNOWN_LANGS]
    assert not unnamed, f"code blocks without a known language ({sorted(KNOWN_LANGS)}): {unnamed}"


@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_code_block(checker, block):
    check_block(checker, block)


@pytest.mark.parametrize("path", DOCS, ids=[p.relative_to(REPO).as_posix() for p in DOCS])
def test_config_keys_in_prose_exist(path):
    for key in set(dotted_key_mentions(prose(path))) - MISSPELLED_ON_PURPOSE:
        check_key(key, str(path.relative_to(REPO)))


@pytest.mark.parametrize("path", DOCS, ids=[p.relative_to(REPO).as_posix() for p in DOCS])
def test_relative_links_lead_somewhere(path):
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(path)):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        file = target.split("#")[0]
        assert (path.parent / file).exists(), f"{path.relative_to(REPO)}: link to {target}: no such file"


def test_every_ddetr_command_is_shown():
    checker = DocsChecker(tracked_top_level())
    for block in BLOCKS:
        if block.lang in SHELL_LANGS:
            check_shell_text(checker, block.text, block.where)
    shown = {args[0] for args in checker.checked.ddetr_commands}
    assert set(COMMANDS) <= shown, f"no example of ddetr {sorted(set(COMMANDS) - shown)} in the docs"


def test_the_configuration_reference_is_current():
    spec = importlib.util.spec_from_file_location("config_reference", REPO / "tools" / "config_reference.py")
    tool = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tool  # its dataclasses look their module up there
    spec.loader.exec_module(tool)
    written = tool.OUTPUT.read_text() if tool.OUTPUT.is_file() else ""
    assert written == tool.render(), ("docs/configuration-reference.md is stale: "
                                      ".venv/bin/python tools/config_reference.py --write")
    for key in ("name", "model.hidden_dim", "train.zero_stage", "ray.num_workers"):
        assert f"| `{key}` |" in written


# ------------------------------------------------------------------ the checks can fail


@pytest.mark.parametrize("text, message", [
    ("ddetr train --confg configs/demo.yaml", "unrecognized arguments: --confg"),
    ("ddetr trian --config configs/demo.yaml", "Did you mean 'train'?"),
    ("ddetr train --config configs/demo.yaml train.max_stepz=3", "Did you mean 'max_steps'?"),
    ("ddetr train --config configs/demo.yaml train.max_steps=many", "expected an integer"),
    ("ddetr train --config configs/nonexistent.yaml", "no configs/nonexistent.yaml"),
    (".venv/bin/ddetr eval --checkpoint r.pth \\\n    ray.num_workerz=2   # a comment", "num_workerz"),
    ("RAY_ADDRESS=http://h:8265 launch/submit.sh --no-wait --config configs/base.yaml optim.lrr=1",
     "Did you mean 'lr'?"),
    ('DDETR_OVERRIDES="train.precison=bf16" sbatch --nodes=2 launch/slurm/ddetr.sbatch', "precison"),
    ("python -m ddetr_dist.tune --sweep s.yaml --retry-erored", "unrecognized arguments: --retry-erored"),
    ("python -m ddetr_dist.ops --chek", "unrecognized arguments: --chek"),
    ("ddetr bench msda --devise cuda", "unrecognized arguments: --devise"),
    ("ddetr predict a.jpg --checkpoint <run dir> data.val_scael=800", "val_scael"),
    ("ray job logz -f <submission id>", "is not a ray command"),
])
def test_a_wrong_command_fails(checker, text, message):
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_shell_text(checker, text)


def test_what_a_shell_allows_passes(checker):
    check_shell_text(checker, """
# a comment line
RAY_ADDRESS=http://HEAD:8265 .venv/bin/ddetr train --config configs/base.yaml \\
    name=$NAME output_dir=/shared/runs ray.address=<head>:6379   # env prefix, $VAR, placeholder
mkdir -p runs && .venv/bin/ddetr predict photos/ --checkpoint <run dir> data.val_scale=800 --out preds
.venv/bin/ray job submit --address http://127.0.0.1:8265 -- ddetr train --config /home/ray/ddetr_dist/configs/demo.yaml
""")
    assert [args[0] for args in checker.checked.ddetr_commands][-3:] == ["train", "predict", "train"]


def test_a_wrong_key_in_prose_or_a_sweep_fails():
    assert dotted_key_mentions("set `train.grad_accum=k`, see `train.py` and `optim.lrr`") == \
        ["train.grad_accum", "optim.lrr"]
    with pytest.raises(AssertionError, match="Did you mean 'lr'"):
        check_key("optim.lrr", "test")
    with pytest.raises(AssertionError, match="is a section"):
        check_key("optim", "test")
    with pytest.raises(AssertionError, match="dec_n_point"):
        check_yaml_block("space:\n  model.dec_n_point: {choice: [2, 4]}\n", "test")
