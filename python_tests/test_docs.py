"""The README and the pages under docs/ stay true to the repository.

- every relative link resolves, to a file and, with ``#anchor``, to one of its headings;
- every repository path they name (``docs/...``, ``bench/...``, ``python_tests/...``, ...) exists;
- every ``python -m`` module of the project exists (and any other is a known tool);
- every Python snippet runs, unless an HTML comment right above it says why not:
  ``<!-- docs-test: skip: REASON -->``, or runs it with hub checkpoints replaced by tiny random
  ones from ``divprune_ext.testing``: ``<!-- docs-test: tiny HUB_ID=KIND [HUB_ID=KIND ...] -->``.
"""
import ast
import glob
import importlib.util
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
# Paths under these top-level folders are the repository's; others (vllm/..., a hub id) are not.
TOP_DIRS = ("bench", "csrc", "divprune_ext", "docs", "python_tests", "scripts", ".ci")
PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w./*-]*)" % "|".join(re.escape(d) for d in TOP_DIRS))
MODULE = re.compile(r"\bpython3?(?:\s+-[A-Za-z]+)*\s+-m\s+([A-Za-z_][\w.]*)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
MARKER = re.compile(r"^<!--\s*docs-test:\s*(.*?)\s*-->$")
PROJECT_MODULES = ("bench", "divprune_ext", "python_tests", "scripts")
TOOLS = {"pip", "pytest", "build", "venv", "lmms_eval"}  # modules of other projects the pages run


@dataclass
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: Optional[str]  # the docs-test comment right above it, without "docs-test:"


def read(page: str) -> str:
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


def split(text: str, page: str = "<text>"):
    """(prose lines outside fenced blocks, fenced blocks)."""
    prose: List[str] = []
    blocks: List[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = re.match(r"^(\s*)(`{3,})(\w*)", lines[i])
        if not opening:
            prose.append(lines[i])
            i += 1
            continue
        fence, lang, start = opening.group(2), opening.group(3), i
        i += 1
        body = []
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        indent = len(opening.group(1))
        above = MARKER.match(prose[-1].strip()) if prose else None  # the line right above the fence
        marker = above.group(1) if above else None
        blocks.append(Block(page, start + 1, lang, "\n".join(line[indent:] for line in body), marker))
        prose.append("")  # a block ends a paragraph
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but ``-`` and ``_`` dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: str) -> set:
    prose, _ = split(read(page), page)
    seen: Dict[str, int] = {}
    out = set()
    for line in prose:
        heading = re.match(r"^#{1,6}\s+(.*)$", line)
        if heading:
            base = slug(heading.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(text: str, page: str) -> List[str]:
    """The relative links of ``text`` (a page at ``page``) that lead nowhere."""
    prose, _ = split(text, page)
    bad = []
    for target in LINK.findall("\n".join(prose)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path else \
            os.path.join(ROOT, page)
        if not os.path.exists(resolved):
            bad.append(f"{target}: no such file")
        elif anchor and resolved.endswith(".md") and anchor not in anchors(os.path.relpath(resolved, ROOT)):
            bad.append(f"{target}: no heading #{anchor} in {os.path.relpath(resolved, ROOT)}")
    return bad


def missing_paths(text: str) -> List[str]:
    bad = []
    for path in sorted(set(PATH.findall(text))):
        path = path.rstrip(".,")
        full = os.path.join(ROOT, path)
        if not (glob.glob(full) if "*" in path else os.path.exists(full)):
            bad.append(path)
    return bad


def unknown_modules(text: str) -> List[str]:
    bad = []
    for module in sorted(set(MODULE.findall(text))):
        module = module.rstrip(".")
        top = module.split(".")[0]
        if top in TOOLS:
            continue
        if top not in PROJECT_MODULES:
            bad.append(f"{module}: neither the project's nor a known tool")
            continue
        base = os.path.join(ROOT, *module.split("."))
        if not (os.path.exists(base + ".py") or os.path.exists(os.path.join(base, "__main__.py"))):
            bad.append(f"{module}: no {os.path.relpath(base, ROOT)}.py or {os.path.relpath(base, ROOT)}/__main__.py")
    return bad


def python_blocks(page: str) -> List[Block]:
    return [b for b in split(read(page), page)[1] if b.lang == "python"]


SNIPPETS = [b for page in PAGES for b in python_blocks(page)]


@pytest.mark.parametrize("page", PAGES)
def test_links_resolve(page):
    assert broken_links(read(page), page) == []


@pytest.mark.parametrize("page", PAGES)
def test_named_paths_exist(page):
    assert missing_paths(read(page)) == []


@pytest.mark.parametrize("page", PAGES)
def test_python_m_modules_exist(page):
    assert unknown_modules(read(page)) == []


def test_the_checks_catch_what_they_check():
    readme = read("README.md")
    assert broken_links(readme, "README.md") == []
    assert broken_links(readme.replace("(docs/vllm.md)", "(docs/vllm_serving.md)", 1), "README.md") == \
        ["docs/vllm_serving.md: no such file"]
    assert broken_links("[a](vllm.md#no-such-heading) [b](#measured)", "docs/benchmarks.md") == \
        ["vllm.md#no-such-heading: no heading #no-such-heading in docs/vllm.md", "#measured: no heading "
         "#measured in docs/benchmarks.md"]
    assert broken_links("[ok](../README.md#measured) [ok](https://example.org/x.md)", "docs/vllm.md") == []
    assert missing_paths("see `bench/nothing.py` and python_tests/test_*.py, docs/vllm.md.") == ["bench/nothing.py"]
    assert unknown_modules("python -m bench.nothing; python3 -P -m pytest; python -m bench") == \
        ["bench.nothing: no bench/nothing.py or bench/nothing/__main__.py"]
    assert unknown_modules("python -m benchh") == ["benchh: neither the project's nor a known tool"]
    assert slug("Versions, runners and CUDA graphs") == "versions-runners-and-cuda-graphs"
    assert slug("What `generate()` returns") == "what-generate-returns"


def test_readme_first_calls_run():
    """The README's snippets for the operator and transformers run here (not marked as skipped)."""
    run = [b.code for b in python_blocks("README.md") if not (b.marker or "").startswith("skip")]
    assert any("divprune_ext.prune(" in code for code in run)
    assert any("divprune_ext.hf.prune_inputs(" in code for code in run)


def _missing_imports(code: str) -> List[str]:
    missing = []
    for node in ast.walk(ast.parse(code)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        for name in names:
            if importlib.util.find_spec(name.split(".")[0]) is None:
                missing.append(name.split(".")[0])
    return missing


@pytest.mark.parametrize("block", SNIPPETS, ids=[f"{b.page}:{b.line}" for b in SNIPPETS])
def test_snippet_runs(block, tmp_path, monkeypatch):
    code, marker = block.code, block.marker
    if marker is not None:
        kind, _, rest = marker.partition(" ")
        if marker.startswith("skip:"):
            reason = marker[len("skip:"):].strip()
            assert reason, f"{block.page}:{block.line}: a skipped snippet says why"
            pytest.skip(f"marked as not run: {reason}")
        assert kind == "tiny" and rest, f"{block.page}:{block.line}: unknown docs-test marker {marker!r}"
    missing = _missing_imports(code)
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    if marker is not None:
        from divprune_ext import testing
        for pair in rest.split():
            hub_id, _, kind = pair.partition("=")
            assert f'"{hub_id}"' in code, f"{block.page}:{block.line} names no {hub_id!r}"
            path = testing.build(kind, str(tmp_path / kind))
            code = code.replace(f'"{hub_id}"', repr(path))
    monkeypatch.chdir(ROOT)  # snippets name repository files relative to the root
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    exec(compile(code, f"{block.page}:{block.line}", "exec"), {"__name__": "__docs__"})
