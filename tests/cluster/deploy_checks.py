"""Reading the shell commands out of the deployment files in cluster/ and checking that what
they name exists here: repository files (scripts, configs, constraints), Python modules and
the names a `python -c` snippet imports, `ray` subcommands and their options (parsed by Ray's
own CLI), `ddetr` commands, and for `ddetr train` a config that loads.

A command runs on a node where this checkout sits at `remote_root` (the launcher's file_mounts
target, the image's COPY destination), in a folder unknown until it `cd`s (a job's entrypoint,
a launcher command), or, for the usage lines in the files' comments, in the repository itself.
Paths are mapped back to the repository by those rules.
"""
from __future__ import annotations

import ast
import importlib
import importlib.machinery
import importlib.util
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import click

from ddetr_dist.cli import COMMANDS, build_parser
from ddetr_dist.config import Config, load_config

REPO = Path(__file__).resolve().parents[2]
SEPARATORS = {";", "&&", "||", "|", "&", "(", ")", "{", "}"}
PYTHON = re.compile(r"python(3(\.\d+)?)?$")
USAGE_PROMPT = "$ "  # usage lines in the files' comments: `#   $ ray up -y cluster/gpu-cloud.yaml`


def setup_env_venv() -> str:
    """The venv folder tools/setup_env.sh makes (its VENV default): commands may name files in
    it, which no checkout has before setup."""
    found = re.search(r"VENV=\$\{VENV:-([^}]+)\}", (REPO / "tools" / "setup_env.sh").read_text())
    assert found, "tools/setup_env.sh no longer sets VENV=${VENV:-...}"
    return found.group(1)


def simple_commands(text: str) -> list[list[str]]:
    """Shell text -> its simple commands as word lists (split at ; && || | and braces; quotes
    kept as the shell keeps them; redirections dropped; leading VAR=value and sudo dropped)."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, words, tokens = [], [], list(lexer)
    skip_next = False
    for token in tokens:
        if skip_next:
            skip_next = False
        elif token in SEPARATORS:
            commands.append(words)
            words = []
        elif set(token) <= set("<>&"):  # a redirection: drop it and its target
            skip_next = True
        else:
            words.append(token)
    commands.append(words)
    out = []
    for words in commands:
        while words and (words[0] == "sudo" or re.match(r"^[A-Za-z_]\w*=", words[0])):
            words = words[1:]
        if words:
            out.append(words)
    return out


def usage_lines(path: Path) -> list[str]:
    """The `$ command` lines of a file's comments (a trailing backslash continues a line)."""
    lines, current = [], None
    for raw in path.read_text().splitlines():
        text = raw.strip().lstrip("#").strip()
        if current is not None:
            current += " " + text.rstrip("\\").strip()
        elif text.startswith(USAGE_PROMPT):
            current = text[len(USAGE_PROMPT):].rstrip("\\").strip()
        else:
            continue
        if not text.endswith("\\"):
            lines.append(current)
            current = None
    return lines


@dataclass
class Checked:
    """What the commands of one file named: every `ray` and `ddetr` invocation, every
    repository file, and the config of every `ddetr train`."""

    ray_commands: list[tuple[str, dict]] = field(default_factory=list)  # ("job submit", click params)
    ddetr_commands: list[list[str]] = field(default_factory=list)
    repo_files: set[Path] = field(default_factory=set)
    train_configs: list[Config] = field(default_factory=list)


def module_exists(name: str) -> bool:
    if name == "pip":
        # not importlib.util.find_spec: setuptools' distutils shim watches for pip's lookup and
        # turns itself off for the rest of the process (torch's cpp_extension, which imports
        # setuptools, then fails in every later test that builds the op)
        return importlib.machinery.PathFinder.find_spec(name) is not None
    return importlib.util.find_spec(name) is not None


class CommandChecker:
    """Checks commands run on a node with the checkout at `remote_root` (None: no checkout
    there), or, with cwd_in_repo, in the repository."""

    def __init__(self, remote_root: str | None):
        self.remote_root = remote_root.rstrip("/") if remote_root else None
        self.venv = setup_env_venv()
        self.checked = Checked()

    def repo_path(self, word: str, cwd_in_repo: bool) -> Path | None:
        """The repository path `word` means, or None when it means something else (a system or
        shared path, an option, a name). Paths in the venv are not in a fresh checkout."""
        root = self.remote_root
        if root and (word == root or word.startswith(root + "/")):
            rel = word[len(root):].lstrip("/") or "."
        elif word.startswith(("/", "~", "-", "$")) or not cwd_in_repo:
            return None
        else:
            rel = word
        first = rel.split("/")[0]
        if first == self.venv or not (REPO / first).exists():
            return None
        return Path(rel)

    def check_repo_files(self, words: list[str], cwd_in_repo: bool, where: str) -> None:
        """Every word that names a file of the repository names one that exists."""
        for word in words:
            path = self.repo_path(word, cwd_in_repo)
            if path is not None:
                assert (REPO / path).exists(), f"{word!r} in {where}: no {path} in the repository"
                self.checked.repo_files.add(path)

    def check(self, text: str, cwd_in_repo: bool = False) -> Checked:
        """Check every simple command of the shell text `text`, run in the checkout when
        `cwd_in_repo` (else somewhere unknown until a `cd`); raise AssertionError (or the
        config's ConfigError) naming what does not exist."""
        for words in simple_commands(text):
            self.check_repo_files(words, cwd_in_repo, repr(text))
            program, args = Path(words[0]).name, words[1:]
            if program == "cd":
                cwd_in_repo = bool(args) and self.repo_path(args[0], True) == Path(".")
            elif program in ("bash", "sh") and args:
                assert self.repo_path(args[0], cwd_in_repo), f"{text!r}: {args[0]} is not a script of the repository"
            elif PYTHON.match(program):
                self.check_python(args, text)
            elif program == "ray":
                self.check_ray(args, text)
            elif program == "ddetr":
                self.check_ddetr(args, text, cwd_in_repo)
        return self.checked

    def check_python(self, args: list[str], text: str) -> None:
        for i, arg in enumerate(args):
            if arg == "-m":
                module = args[i + 1]
                assert module_exists(module), f"{text!r}: no module {module}"
                if module == "ray.scripts.scripts":  # the `ray` command itself
                    self.check_ray(args[i + 2:], text)
                return
            if arg == "-c":
                check_python_snippet(args[i + 1], text)
                return

    def check_ray(self, args: list[str], text: str) -> None:
        """The subcommand exists and Ray's own CLI parses the options (without running it)."""
        from ray.scripts.scripts import cli

        command, names = cli, []
        while isinstance(command, click.Group) and args and args[0] in command.commands:
            names.append(args[0])
            command, args = command.commands[args[0]], args[1:]
        assert names, f"{text!r}: `ray {' '.join(args[:1])}` is not a ray command"
        try:
            params = command.make_context("ray " + " ".join(names), list(args)).params
        except click.ClickException as e:
            raise AssertionError(f"{text!r}: {e.format_message()}") from None
        self.checked.ray_commands.append((" ".join(names), params))
        if names == ["job", "submit"]:  # the job's entrypoint runs on the head, beside the checkout
            self.check(shlex.join(params["entrypoint"]))

    def check_ddetr(self, args: list[str], text: str, cwd_in_repo: bool) -> None:
        assert args and args[0] in COMMANDS, f"{text!r}: `ddetr {args[:1]}` is not one of {sorted(COMMANDS)}"
        self.checked.ddetr_commands.append(args)
        if args[0] != "train":
            return
        parsed = build_parser("train")[0].parse_intermixed_args(args[1:])  # as `ddetr train` parses them
        config = self.repo_path(parsed.config, cwd_in_repo) if parsed.config else None
        assert config, f"{text!r}: --config {parsed.config} is not a config file of the repository"
        self.checked.train_configs.append(load_config(REPO / config, parsed.overrides))


def repo_module_names(module: str) -> set[str] | None:
    """The top-level names a module of this repository defines or imports, read from its source
    (not imported: ddetr_dist.ops would pull in torch), or None for a module from elsewhere."""
    base = REPO / Path(*module.split("."))
    source = next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)
    if source is None:
        return None
    names = {p.stem for p in base.iterdir() if p.suffix == ".py" or p.is_dir()} if base.is_dir() else set()
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def module_names(module: str) -> set[str]:
    names = repo_module_names(module)
    if names is None:
        assert importlib.util.find_spec(module), f"no module {module}"
        names = set(dir(importlib.import_module(module)))
    return names


def check_python_snippet(code: str, text: str) -> None:
    """Every module a `python -c` snippet imports exists, with the names it takes from it and the
    functions it calls on a module it imported (`build.get_extension`)."""
    tree = ast.parse(code)
    modules = {}  # name in the snippet -> the module it is
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                module_names(alias.name)
                modules[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom):
            names = module_names(node.module)
            for alias in node.names:
                assert alias.name in names, f"{text!r}: {node.module} has no {alias.name}"
                submodule = f"{node.module}.{alias.name}"
                if repo_module_names(submodule) is not None:
                    modules[alias.asname or alias.name] = submodule
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            module = modules[node.value.id]
            assert node.attr in module_names(module), f"{text!r}: {module} has no {node.attr}"
