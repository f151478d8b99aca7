"""Every reference in the repository resolves inside it: README.md and docs/*.md links (files, headings, line
anchors), the docs/ paths that code names, the README's size, and no pointer to files the repository lacks.

A line anchor whose link text is code, [`encode_text`](../ump.py#L214), must land on a line that contains that
name. When a file above it changes, `python tests/test_docs.py --fix` moves each such anchor to the name's
definition (or its first mention) and prints what it moved.
"""
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKDOWN = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                                  if f.endswith(".md"))
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(([^()\s]+)\)")  # [text](target), ![alt](image)
ANCHOR = re.compile(r"^L(\d+)(?:-L(\d+))?$")
README_MAX_BYTES = 15_000
# pointers to notes that are not in the repository (spelled so that this file does not contain them)
FORBIDDEN = ("spec \u00a7", "shared" + "/", "DESIGN" + ".md")
SKIP_DIRS = {".git", "__pycache__", "out", "runs", "bench_results", ".cache", ".pytest_cache", "venv"}


def lines_of(path):
    with open(path, encoding="utf-8") as f:
        return f.read().split("\n")


def slug(heading):  # GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(path):
    text = re.sub(r"```.*?```", "", "\n".join(lines_of(path)), flags=re.S)  # no headings inside code blocks
    return {slug(m) for m in re.findall(r"^#{1,6} +(.+?) *#*$", text, flags=re.M)}


def symbol(text):  # [`UMP.encode_text`](...) -> "encode_text"; None when the link text is not code
    m = re.fullmatch(r"`([^`]+)`", text.strip())
    names = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", m.group(1)) if m else []
    return names[-1] if names else None


def mentions(line, text):
    """A code link text `a.b.name` or `name()` needs `name` on its line; any other code text, all of it."""
    code = text.strip().strip("`")
    if re.fullmatch(r"[\w.]+(\(\))?", code):
        return re.search(rf"\b{symbol(text)}\b", line) is not None
    return code in line


def definition_line(lines, text):
    """1-based line for a code link text: the def / class of its name, else its first assignment, else a line
    holding the whole text, else its first mention; None if the file never names it."""
    name, code = symbol(text), text.strip().strip("`")
    tests = [lambda l: re.match(rf"\s*(def|class) {name}\b", l), lambda l: re.match(rf"\s*{name}\s*=[^=]", l),
             lambda l: code in l, lambda l: re.search(rf"\b{name}\b", l)]
    if not re.fullmatch(r"[\w.]+(\(\))?", code):  # an expression such as `y = y + X`: the line that holds it
        tests = tests[2:]
    for test in tests:
        for i, line in enumerate(lines):
            if test(line):
                return i + 1
    return None


def links():
    """(markdown file, line number, text, target) for every link in README.md and docs/*.md."""
    for md in MARKDOWN:
        in_code, text = False, "\n".join(lines_of(os.path.join(ROOT, md)))
        text = re.sub(r"<!--.*?-->", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)  # not shown
        for n, line in enumerate(text.split("\n"), 1):
            if line.lstrip().startswith("```"):
                in_code = not in_code
            if not in_code:
                for m in LINK.finditer(re.sub(r"``[^`]*``", "", line)):
                    yield md, n, m.group(1), m.group(2)


def problems(fix=False):
    """Every broken reference, as 'file:line: what' strings. fix=True rewrites stale code anchors in place."""
    out, edits = [], {}
    for md, n, text, target in links():
        if re.match(r"[a-z]+:", target):  # https:, mailto:: outside the repository by intent
            continue
        path, _, anchor = target.partition("#")
        file = os.path.normpath(os.path.join(ROOT, os.path.dirname(md), path)) if path else os.path.join(ROOT, md)
        where = f"{md}:{n}: {target}"
        if not file.startswith(ROOT + os.sep) or not os.path.exists(file):
            out.append(f"{where}: no such file in the repository")
            continue
        if not anchor or os.path.isdir(file):
            continue
        if file.endswith(".md") and not ANCHOR.match(anchor):
            if anchor not in headings(file):
                out.append(f"{where}: no heading #{anchor} in {os.path.relpath(file, ROOT)}")
            continue
        m = ANCHOR.match(anchor)
        if not m:
            out.append(f"{where}: a line anchor is #L<n> or #L<n>-L<m>")
            continue
        lines, first, last = lines_of(file), int(m.group(1)), int(m.group(2) or m.group(1))
        name, inside = symbol(text), 1 <= first <= last <= len(lines)
        if inside and (not name or mentions(lines[first - 1], text)):
            continue
        now = definition_line(lines, text) if name else None
        out.append(f"{where}: " + (f"line {first} does not hold {text}" if inside else
                                   f"{os.path.relpath(file, ROOT)} has {len(lines)} lines")
                   + (f" (line {now} does)" if now else ""))
        if fix and now:
            edits.setdefault(md, []).append((text, target, f"{path}#L{now}" + (f"-L{now + last - first}"
                                                                              if m.group(2) else "")))
    for md, changes in edits.items():
        text = open(os.path.join(ROOT, md), encoding="utf-8").read()
        for link_text, old, new in changes:  # the text too: two names may share one stale line
            text = text.replace(f"[{link_text}]({old})", f"[{link_text}]({new})")
            print(f"{md}: {old} -> {new}")
        open(os.path.join(ROOT, md), "w", encoding="utf-8").write(text)
    return out


def repository_files():
    for top, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".venv")]
        for f in files:
            yield os.path.join(top, f)


def test_every_markdown_link_resolves():
    assert problems() == []


def test_docs_paths_named_in_code_exist():
    missing = []
    for path in repository_files():
        if path.endswith(".py"):
            for n, line in enumerate(lines_of(path), 1):
                for ref in re.findall(r"\bdocs/[\w./-]*\w", line):
                    if not os.path.exists(os.path.join(ROOT, ref)):
                        missing.append(f"{os.path.relpath(path, ROOT)}:{n}: {ref}")
    assert missing == []


def test_readme_reads_in_five_minutes():
    assert os.path.getsize(os.path.join(ROOT, "README.md")) <= README_MAX_BYTES


def test_no_pointers_to_files_outside_the_repository():
    found = []
    for path in repository_files():
        with open(path, "rb") as f:
            content = f.read()
        found += [f"{os.path.relpath(path, ROOT)}: {s!r}" for s in FORBIDDEN if s.encode() in content]
    assert found == []


if __name__ == "__main__":
    if sys.argv[1:] not in ([], ["--fix"]):
        sys.exit("usage: python tests/test_docs.py [--fix]")
    left = problems(fix=sys.argv[1:] == ["--fix"])
    left = problems() if sys.argv[1:] == ["--fix"] else left
    print("\n".join(left) if left else "every reference resolves")


def test_fix_moves_an_anchor_to_the_definition_not_a_comment():
    lines = ["# --stage pretrain uses PRETRAINING", "PRETRAINING = {}", "x = read_split(1)", "def read_split(data):"]
    assert definition_line(lines, "`PRETRAINING`") == 2
    assert definition_line(lines, "`data.read_split()`") == 4
