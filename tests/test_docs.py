"""The documentation stays in step with the code: README.md, every docs/*.md page (and the site they build) and
every experiments/<name>/README.md.

Issue #23 item 8. Each command a page shows (a ```bash block, or an inline code span that starts with
``python -m vlmsae.``, ``torchrun`` or ``make``) is checked without running it:

- ``python -m vlmsae.<job> ...`` (also through ``torchrun``): a Hydra job composes its overrides against the real
  ``conf/`` tree, so an unknown key, group option or experiment fails; a multirun composes at each sweep's first
  value. Any other module must exist and take every ``--flag`` the page passes it.
- ``make <target>``: the Makefile has the target.
- ``<group>.<key>=<value>`` in the prose (``data.fast_decode=true``): some job's config has the key.

Placeholders are allowed where the reader fills in a value: ``<run>`` (a string in a value, skipped as a bare word)
and ``...`` (the rest of a command shown elsewhere). Shell variables defined in the same block (``SAE=...``,
``L=(...)``) are expanded. Every relative link and image resolves, every repository path named in backticks
(``conf/...``, ``vlmsae/...``, ``experiments/...``) exists, and every dotted ``vlmsae.<module>[.<name>]`` imports.
README.md stays a front door (under 200 lines), and ``mkdocs build --strict`` builds the site.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from vlmsae.config import conf_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS_PAGES = sorted((REPO_ROOT / "docs").glob("*.md"))  # the site's pages (mkdocs.yml's nav)
PAGES = [REPO_ROOT / "README.md", *DOCS_PAGES, *sorted((REPO_ROOT / "experiments").glob("*/README.md"))]
README_MAX_LINES = 200

_FENCE_RE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
_INLINE_RE = re.compile(r"(?<!`)`(?!`)((?:[^`\n]|\n(?!\s*\n))+?)`(?!`)")  # may wrap, never past a paragraph
_LINK_RE = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)\)")
_PLACEHOLDER_RE = re.compile(r"<[^<>\n]*>")
_PLACEHOLDER = "PLACEHOLDER"
_REPO_PATH_RE = re.compile(r"^(?:\.ci|conf|docs|experiments|tests|vlmsae)/[\w./-]*$")
_DOTTED_RE = re.compile(r"^vlmsae(?:\.\w+)+")
_ARRAY_RE = re.compile(r"^(\w+)=\((.*)\)$")
_ASSIGN_RE = re.compile(r"^(?:export\s+)?(\w+)=(\S+)$")
_COMMAND_STARTS = ("python -m vlmsae.", "torchrun ", "make ")


def _page_id(fpath: Path) -> str:
    return fpath.relative_to(REPO_ROOT).as_posix()


def _strip_fences(text: str) -> str:
    return _FENCE_RE.sub("", text)


def _inline_spans(text: str) -> list[str]:
    return [" ".join(span.split()) for span in _INLINE_RE.findall(_strip_fences(text))]


def _shell_lines(block: str) -> list[str]:
    """The logical lines of a bash block: continuation lines joined, placeholders made plain words."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [_PLACEHOLDER_RE.sub(_PLACEHOLDER, line) for line in joined.splitlines() if line.strip()]


def _commands(text: str) -> list[list[str]]:
    """Every command of a page as a token list, shell variables of its block expanded."""
    commands = []
    sources = [(block, True) for lang, block in _FENCE_RE.findall(text) if lang in ("bash", "sh", "shell")]
    sources += [(span, False) for span in _inline_spans(text) if span.startswith(_COMMAND_STARTS)]
    for source, is_block in sources:
        variables: dict[str, list[str]] = {}
        for line in _shell_lines(source):
            tokens = shlex.split(line, comments=is_block)
            if not tokens:
                continue
            if m := _ARRAY_RE.match(line.split("#", 1)[0].strip()):
                variables[m.group(1)] = shlex.split(m.group(2))
                continue
            if len(tokens) <= 2 and (m := _ASSIGN_RE.match(" ".join(tokens))):
                variables[m.group(1)] = [m.group(2)]
                continue
            expanded = []
            for token in tokens:
                for name, value in variables.items():
                    if token == f"${{{name}[@]}}":
                        expanded.extend(value)
                        break
                    token = token.replace(f"${{{name}}}", " ".join(value)).replace(f"${name}", " ".join(value))
                else:
                    expanded.append(token)
            commands.append(expanded)
    return commands


def _vlmsae_invocation(tokens: list[str]) -> tuple[str, list[str]] | None:
    """(module, its arguments) for `python -m vlmsae.X ...` or `torchrun ... -m vlmsae.X ...`, else None."""
    for i, token in enumerate(tokens[:-1]):
        if token == "-m" and tokens[i + 1].startswith("vlmsae"):
            return tokens[i + 1], tokens[i + 2 :]
    return None


def _hydra_jobs() -> set[str]:
    return {p.stem for p in conf_dir().glob("*.yaml")}


def _first_of_each_sweep(overrides: list[str]) -> list[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    out = []
    for text, override in zip(overrides, parsed, strict=True):
        if override.is_sweep_override():
            first = next(iter(override.sweep_string_iterator()))
            out.append(f"{override.get_key_element()}={first}")
        else:
            out.append(text)
    return out


def _check_hydra_job(job: str, args: list[str], compose) -> str | None:
    overrides, multirun = [], False
    it = iter(args)
    for arg in it:
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg == "--config-dir":
            return None  # the reader's own config tree: its options are not ours to check
        elif arg in ("--cfg", "--info"):
            next(it, None)
        elif arg in ("--help", "-h", "...", _PLACEHOLDER):
            continue
        elif "=" in arg:
            key, _, value = arg.partition("=")
            if value == _PLACEHOLDER and (conf_dir() / key).is_dir():
                continue  # `model=<name>`: the reader's choice of a group that exists
            overrides.append(arg)
        else:
            return f"{arg!r} is not a key=value override"
    try:
        if multirun:
            overrides = _first_of_each_sweep(overrides)
        compose(job, overrides)
    except Exception as err:  # the whole chain: Hydra wraps the OmegaConf error that names the key
        parts = []
        while err is not None:
            parts.append(str(err).strip().splitlines()[0])
            err = err.__cause__ or err.__context__
        return " <- ".join(parts)
    return None


def _module_sources(module: str) -> str | None:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    fpaths = [Path(spec.origin)]
    if spec.submodule_search_locations:
        fpaths.append(Path(spec.origin).with_name("__main__.py"))
    return "\n".join(f.read_text(encoding="utf-8") for f in fpaths if f.is_file())


def _check_plain_module(module: str, args: list[str]) -> str | None:
    source = _module_sources(module)
    if source is None:
        return f"no module {module}"
    flags = [a.split("=", 1)[0] for a in args if a.startswith("--")]
    unknown = [f for f in flags if f'"{f}"' not in source]
    return f"{module} takes no {unknown}" if unknown else None


def _make_targets() -> set[str]:
    return set(re.findall(r"^([a-zA-Z_-]+):", (REPO_ROOT / "Makefile").read_text(encoding="utf-8"), re.M))


@pytest.fixture(scope="module")
def compose():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from vlmsae.config import register_configs

    register_configs()

    def _compose(job: str, overrides: list[str]):
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            hydra_compose(config_name=job, overrides=overrides, return_hydra_config=True)

    return _compose


def _command_problems(text: str, compose) -> tuple[list[str], int]:
    problems, n_checked = [], 0
    jobs, targets = _hydra_jobs(), _make_targets()
    for tokens in _commands(text):
        shown = " ".join(tokens)
        if tokens[0] == "make":
            missing = [t for t in tokens[1:] if not t.startswith("-") and "=" not in t and t not in targets]
            problems += [f"`{shown}`: the Makefile has no target {t!r}" for t in missing]
            n_checked += 1
            continue
        invocation = _vlmsae_invocation(tokens)
        if invocation is None:
            continue  # git, huggingface-cli, srun's own flags, ...: not vlmsae's to check
        module, args = invocation
        if module == f"vlmsae.{_PLACEHOLDER}":
            continue  # `python -m vlmsae.<job> ...`: any job
        job = module.removeprefix("vlmsae.")
        problem = _check_hydra_job(job, args, compose) if job in jobs else _check_plain_module(module, args)
        n_checked += 1
        if problem:
            problems.append(f"`{shown}`: {problem}")
    return problems, n_checked


@pytest.mark.parametrize("fpath", PAGES, ids=_page_id)
def test_every_command_composes_and_every_target_exists(fpath, compose):
    problems, _n = _command_problems(fpath.read_text(encoding="utf-8"), compose)
    assert not problems, f"{_page_id(fpath)}: commands out of step with the code:\n" + "\n".join(problems)


def test_the_command_check_fails_on_a_typo_an_unknown_option_and_a_missing_target(compose):
    page = """```bash
python -m vlmsae.train sae.kk=3
python -m vlmsae.train model=clip_l15
python -m vlmsae.train layer=11,17          # a sweep without -m
python -m vlmsae.train -m layer=11,17 sae.expansion=1,2
SAE=outputs/train/<run>/sae
python -m vlmsae.monosemanticity sae_path=$SAE embedder=clip_b32 \\
    data=folder data.root=/data/val
python -m vlmsae.demo --steps data --outt x
make docss
```
and inline: `python -m vlmsae.hierarchy taxonomy=wordnett`
"""
    problems, n_checked = _command_problems(page, compose)
    assert n_checked == 8
    expected = ["sae.kk", "clip_l15", "layer=11,17", "--outt", "'docss'", "wordnett"]
    assert len(problems) == len(expected), problems
    for needle, problem in zip(expected, problems, strict=True):
        assert needle in problem, (needle, problem)


def test_pages_hold_the_recipe_commands():
    # the check above must see the commands: a parser that found none would pass every page
    commands = [c for fpath in PAGES for c in _commands(fpath.read_text(encoding="utf-8"))]
    jobs = {inv[0] for c in commands if (inv := _vlmsae_invocation(c))}
    readme_jobs = [
        inv[0]
        for c in _commands((REPO_ROOT / "README.md").read_text())
        if (inv := _vlmsae_invocation(c)) and "PLACEHOLDER" not in inv[0]
    ]
    assert readme_jobs == [
        f"vlmsae.{j}" for j in ("extract", "train", "monosemanticity", "hierarchy", "steer", "browse")
    ]
    assert {"vlmsae.stability", "vlmsae.export", "vlmsae.splice_eval", "vlmsae.demo"} <= jobs


def _reference_problems(text: str, page_dpath: Path) -> list[str]:
    problems = []
    for target in _LINK_RE.findall(text):
        if re.match(r"^(?:[a-z]+:|#)", target):
            continue
        if not (page_dpath / target.split("#", 1)[0]).exists():
            problems.append(f"link {target!r} resolves to nothing")
    spans = _inline_spans(text)
    plain_blocks = [block for lang, block in _FENCE_RE.findall(text) if not lang]  # e.g. the layout tree
    words = [*spans, *(line.split()[0] for block in plain_blocks for line in block.splitlines() if line.split())]
    for word in words:
        if _REPO_PATH_RE.match(word) and not (REPO_ROOT / word).exists():
            problems.append(f"path {word!r} does not exist")
    for span in spans:
        if (m := _DOTTED_RE.match(span)) and not _resolves(m.group(0)):
            problems.append(f"{m.group(0)!r} does not import")
    return problems


@pytest.mark.parametrize("fpath", PAGES, ids=_page_id)
def test_every_link_path_and_dotted_name_exists(fpath):
    problems = _reference_problems(fpath.read_text(encoding="utf-8"), fpath.parent)
    assert not problems, f"{_page_id(fpath)}:\n" + "\n".join(problems)


def test_the_reference_check_fails_on_a_dead_link_path_and_name():
    page = """See [training](training.md), [gone](gone.md), ![img](img/browser.png) and [web](https://x.org).
`vlmsae/sae/checkpoint.py` and `vlmsae/sae/nothing_here.py`; `vlmsae.formats` but `vlmsae.formats.no_such_reader`
and `vlmsae.no_such_module.read(path)`.
```
vlmsae/config/     real
vlmsae/gone/       not
```
"""
    problems = _reference_problems(page, REPO_ROOT / "docs")
    assert problems == [
        "link 'gone.md' resolves to nothing",
        "path 'vlmsae/sae/nothing_here.py' does not exist",
        "path 'vlmsae/gone/' does not exist",
        "'vlmsae.formats.no_such_reader' does not import",
        "'vlmsae.no_such_module.read' does not import",
    ], problems


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


_GROUP_KEY_RE = re.compile(r"^([a-z_]+(?:\.[a-z_0-9]+)+)=")  # `data.fast_decode=true` in the prose
_DELIBERATE_TYPOS = {"sae.kk"}  # config.md shows it failing at compose time


@pytest.fixture(scope="module")
def config_keys() -> set[str]:
    """Every dotted key of every job's composed config (group nodes are dataclasses: every field is there)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import DictConfig

    from vlmsae.config import register_configs

    register_configs()
    keys: set[str] = set()

    def walk(node, prefix: str) -> None:
        for key in node:
            keys.add(f"{prefix}{key}")
            child = node._get_node(key)
            if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
                walk(child, f"{prefix}{key}.")

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        for job in sorted(_hydra_jobs()):
            walk(hydra_compose(config_name=job, overrides=["hydra/launcher=slurm"], return_hydra_config=True), "")
    return keys


def _prose_key_problems(text: str, config_keys: set[str]) -> list[str]:
    groups = {key.split(".", 1)[0] for key in config_keys if "." in key}
    problems = []
    for span in _inline_spans(text):
        for word in span.split():
            m = _GROUP_KEY_RE.match(word)
            if m and m.group(1).split(".", 1)[0] in groups and m.group(1) not in config_keys | _DELIBERATE_TYPOS:
                problems.append(f"`{word}`: no job has the key {m.group(1)!r}")
    return problems


@pytest.mark.parametrize("fpath", PAGES, ids=_page_id)
def test_every_config_key_set_in_the_prose_exists(fpath, config_keys):
    problems = _prose_key_problems(fpath.read_text(encoding="utf-8"), config_keys)
    assert not problems, f"{_page_id(fpath)}:\n" + "\n".join(problems)


def test_the_prose_key_check_fails_on_a_renamed_key(config_keys):
    assert {"data.fast_decode", "sae.sparse_kernel", "hydra.launcher.partition", "val_ms.every_n_steps"} <= config_keys
    text = "Set `data.fast_decode=true`, or `data.fast_decodes=true`, and `trainer.precision=32-true` `x.y=1`."
    expected = ["`data.fast_decodes=true`: no job has the key 'data.fast_decodes'"]
    assert _prose_key_problems(text, config_keys) == expected


# Shape letters: a name ending in one to five capitals (and an optional kept size-1 axis, ``norms_F1``) carries
# its tensor's shape. Names with no lowercase letter are constants (``SAE_FORMAT``, ``HF_HUB_OFFLINE``), not
# shapes; ``.T`` (a transpose) is no suffix. Only vlmsae/'s Python files are read: tests and docs may
# write shapes in prose.
_SHAPE_NAME_RE = re.compile(r"\b[A-Za-z][A-Za-z0-9_]*?_([A-Z]{1,5})1?\b")
_SHAPE_EXAMPLE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*?_[A-Z]{1,5}1?$")


def _shape_names(code: str) -> dict[str, set[str]]:
    """Letter -> the shape-suffixed names of ``code`` that use it."""
    letters: dict[str, set[str]] = {}
    for match in _SHAPE_NAME_RE.finditer(code):
        if re.search("[a-z]", match.group(0)):
            for letter in match.group(1):
                letters.setdefault(letter, set()).add(match.group(0))
    return letters


def _notation_problems(method_md: str, code: str) -> list[str]:
    """What METHOD.md's shape-letter table gets wrong about ``code``: a letter used but not in the table, a
    letter with two rows, a letter in the table that no name uses, an example name that is not in the code."""
    section = method_md.split("## Notation: shape letters in names", 1)[1].split("\n## ", 1)[0]
    rows = [
        line.strip().strip("|").split("|")
        for line in section.splitlines()
        if re.match(r"^\| [A-Z1](, [A-Z])* \|", line)
    ]
    problems, documented = [], []
    for cells in rows:
        documented += [letter.strip() for letter in cells[0].split(",")]
    for letter in sorted({x for x in documented if documented.count(x) > 1}):
        problems.append(f"letter {letter} has more than one row")
    used = _shape_names(code)
    for letter in sorted(set(used) - set(documented)):
        problems.append(f"letter {letter} is used ({', '.join(sorted(used[letter])[:3])}) but not in the table")
    for letter in sorted(set(documented) - set(used) - {"1"}):
        problems.append(f"letter {letter} is in the table but no name in vlmsae/ uses it")
    names = {name for group in used.values() for name in group}
    for cells in rows:
        for example in re.findall(r"`([^`]+)`", cells[1]):
            if _SHAPE_EXAMPLE_RE.match(example) and example not in names:
                problems.append(f"example {example} is not a name in vlmsae/")
    return problems


def test_every_shape_letter_in_the_code_has_one_row_in_the_notation_table():
    code = "\n".join(f.read_text(encoding="utf-8") for f in sorted((REPO_ROOT / "vlmsae").rglob("*.py")))
    problems = _notation_problems((REPO_ROOT / "docs" / "METHOD.md").read_text(encoding="utf-8"), code)
    assert not problems, "docs/METHOD.md's shape-letter table:\n" + "\n".join(problems)


def test_the_notation_check_fails_on_an_undocumented_letter_a_second_row_and_a_stale_example():
    page = """## Notation: shape letters in names

| Letter | Meaning |
|---|---|
| B | batch (`acts_BD`, `old_BT`) |
| D | width (`acts_BD`) |
| D | also width |
| H, W | height and width (`x_BHW`) |

## Next
"""
    code = "acts_BD = x_BHW.T\nHF_HUB_OFFLINE = SAE_FORMAT\nnew_BQD = acts_BD"
    assert _notation_problems(page, code) == [
        "letter D has more than one row",
        "letter Q is used (new_BQD) but not in the table",
        "example old_BT is not a name in vlmsae/",
    ]
    assert _notation_problems(page, code.replace("new_BQD", "new_BD")) == [
        "letter D has more than one row",
        "example old_BT is not a name in vlmsae/",
    ]


def test_readme_is_a_front_door_and_every_page_is_in_the_site():
    n_lines = len((REPO_ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n_lines < README_MAX_LINES, (
        f"README.md has {n_lines} lines (limit {README_MAX_LINES}): move the details to a docs/ page and link it."
    )
    import yaml

    nav = yaml.safe_load((REPO_ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"]

    def pages(node) -> list[str]:
        if isinstance(node, str):
            return [node]
        children = node.values() if isinstance(node, dict) else node
        return [p for child in children for p in pages(child)]

    assert sorted(pages(nav)) == sorted(p.name for p in DOCS_PAGES)


def test_mkdocs_builds_the_site_strictly(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (`make install` installs the dev extra, which has it)")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    home = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
    assert "make demo" in home and 'href="install.html"' in home, "the home page must be README.md, links rewritten"
    assert (tmp_path / "site" / "img" / "browser.png").is_file() and not (tmp_path / "site" / "hooks").exists()
    run_in_re = re.compile(r"<p>(?:(?!</p>).)*\n(?:- |\d+\. )", re.S)  # a list item inside a paragraph
    run_in = [f.name for f in (tmp_path / "site").glob("*.html") if run_in_re.search(f.read_text(encoding="utf-8"))]
    assert not run_in, f"a list ran into the paragraph above it (the hook adds the blank line) in {run_in}"
