"""The pages of docs/ that describe the code, checked against the code, so
that they cannot go stale silently:

- docs/server.md documents every field of ``pagi_ref._CONFIG_FIELDS`` as its
  ``--flag-name``, in a table row that shows the field's default;
- every Python block of docs/tutorial.md is an excerpt of a file in
  examples/ (which tests/test_examples.py runs);
- every Python block of README.md and docs/*.md runs: it is an excerpt of
  a file in examples/ (which runs), or it runs on its own -- it executes,
  and every global name it uses is defined by it or is a builtin -- or it
  is marked as a sketch with an HTML comment ``<!-- sketch: why -->`` on
  the line before its fence;
- every name docs/architecture.md gives in its section map, and every
  ``Class.method`` it mentions, exists in pagi_ref.py.
"""
import builtins
import dis
import glob
import os
import re
import types

import pytest

from conftest import ROOT      # first: it puts the checkout on sys.path
import pagi_ref  # noqa: E402

DOCS = os.path.join(ROOT, "docs")
EXAMPLES = os.path.join(ROOT, "examples")


def read(*parts):
    with open(os.path.join(*parts), encoding="utf-8") as f:
        return f.read()


# -- server.md ---------------------------------------------------------------

def option_rows():
    """{'--flag': row text} for the table rows of server.md's "Options"."""
    text = read(DOCS, "server.md")
    section = text[text.index("\n## Options\n"):]
    section = section[: section.index("\n## ", 1)]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `(--[a-z0-9-]+)`", line)
        if m:
            rows[m.group(1)] = line
    return rows


@pytest.mark.parametrize("field", [f[0] for f in pagi_ref._CONFIG_FIELDS])
def test_server_md_documents_every_config_field_with_its_default(field):
    flag = "--" + field.replace("_", "-")
    rows = option_rows()
    assert flag in rows, "docs/server.md has no table row for %s" % flag
    default = dict((f[0], f[1]) for f in pagi_ref._CONFIG_FIELDS)[field]
    cells = [c.strip() for c in rows[flag].split("|")]
    shown = cells[2]
    if default is None:
        assert shown in ("computed", "off"), (flag, shown)
    elif isinstance(default, str):
        assert shown == '`"%s"`' % default, (flag, shown, default)
    else:
        assert shown == "`%r`" % (default,), (flag, shown, default)


def test_server_md_documents_the_other_options():
    text = read(DOCS, "server.md")
    for flag in ("--no-access-log", "--version", "--help", "--uds", "--fd",
                 "--no-proxy-headers", "--no-server-header", "--no-date-header"):
        assert "`%s`" % flag in text, flag


def test_server_md_has_no_option_the_code_lacks():
    fields = {"--" + f[0].replace("_", "-") for f in pagi_ref._CONFIG_FIELDS}
    negatives = {"--no-" + f[0].replace("_", "-") for f in pagi_ref._CONFIG_FIELDS
                 if f[2] is bool}
    extra = (set(option_rows()) - fields - negatives
             - {"--no-access-log", "--version", "--uds", "--fd"})
    assert not extra, "docs/server.md documents options pagi_ref.py does not have: %s" % extra


# -- tutorial.md ---------------------------------------------------------------

def python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, re.S)


def is_excerpt(block, source):
    """True if the block's lines appear, in order and contiguous, in source,
    all shifted by the same indentation."""
    want = block.rstrip("\n").split("\n")
    have = source.split("\n")
    first = want[0]
    for i, line in enumerate(have):
        if not line.endswith(first.lstrip()) or not line.strip():
            continue
        indent = line[: len(line) - len(first)]
        if line != indent + first:
            continue
        if all(i + j < len(have) and (have[i + j] == (indent + w if w else "")
                                      or (not w and not have[i + j].strip()))
               for j, w in enumerate(want)):
            return True
    return False


def test_every_python_block_of_the_tutorial_is_an_excerpt_of_an_example():
    sources = {name: read(EXAMPLES, name) for name in os.listdir(EXAMPLES)
               if name.endswith(".py")}
    blocks = python_blocks(read(DOCS, "tutorial.md"))
    assert len(blocks) >= 10
    orphans = [b for b in blocks if not any(is_excerpt(b, s) for s in sources.values())]
    assert not orphans, "tutorial blocks not found verbatim in examples/: %r" % orphans


# -- every Python block of README.md and docs/ ----------------------------------

SKETCH = re.compile(r"<!-- sketch: [^>]+ -->\n$")


def all_python_blocks():
    """(file, line, block, is_sketch) for every ```python block."""
    out = []
    for path in [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(DOCS, "*.md"))):
        text = read(path)
        for m in re.finditer(r"```python\n(.*?)```", text, re.S):
            before = text[:m.start()]
            out.append((os.path.relpath(path, ROOT), before.count("\n") + 1, m.group(1),
                        bool(SKETCH.search(before[-200:]))))
    return out


def global_names(code):
    """The global names a code object (and the functions in it) loads."""
    names = {i.argval for i in dis.get_instructions(code)
             if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= global_names(const)
    return names


BLOCKS = all_python_blocks()


@pytest.mark.parametrize("where,line,block,sketch", BLOCKS,
                         ids=["%s:%d" % (b[0], b[1]) for b in BLOCKS])
def test_every_python_block_runs_or_is_marked_a_sketch(where, line, block, sketch):
    if sketch:
        pytest.skip("marked as a sketch")
    sources = [read(EXAMPLES, n) for n in os.listdir(EXAMPLES) if n.endswith(".py")]
    if any(is_excerpt(block, source) for source in sources):
        return          # an excerpt of an example, which test_examples.py runs
    code = compile(block, "%s:%d" % (where, line), "exec")
    namespace = {"__name__": "docs_block"}
    exec(code, namespace)
    undefined = sorted(n for n in global_names(code)
                       if n not in namespace and not hasattr(builtins, n))
    assert not undefined, ("%s:%d uses names it does not define: %s (define them, or mark "
                           "the block <!-- sketch: ... -->)" % (where, line, undefined))


# -- architecture.md -------------------------------------------------------------

def test_architecture_md_names_exist_in_pagi_ref():
    text = read(DOCS, "architecture.md")
    missing = []
    # The section map: every backticked name in the "names" column.
    for line in text.splitlines():
        if not re.match(r"\| (?:[1-9]|1[0-3])[a-z]? \|", line):
            continue
        names_cell = line.split("|")[4]
        names = re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", names_cell)
        classes = [getattr(pagi_ref, n) for n in names
                   if isinstance(getattr(pagi_ref, n, None), type)]
        for name in names:
            if name == "__main__":
                continue
            if not (hasattr(pagi_ref, name) or any(hasattr(c, name) for c in classes)):
                missing.append(name)
    # Anywhere: `Class.attribute`, a class or instance attribute (one set in
    # the code as ``self.attribute``).
    source = read(ROOT, "pagi_ref.py")
    for cls, attr in re.findall(r"`([A-Z][A-Za-z]*)\.([A-Za-z_][A-Za-z0-9_]*)`", text):
        if attr in ("md", "py"):
            continue    # a file name
        if not isinstance(getattr(pagi_ref, cls, None), type):
            missing.append(cls)
        elif not (hasattr(getattr(pagi_ref, cls), attr)
                  or re.search(r"self\.%s = " % attr, source)):
            missing.append("%s.%s" % (cls, attr))
    assert not missing, "docs/architecture.md names what pagi_ref.py lacks: %s" % missing


# -- README.md's first run -------------------------------------------------------------

def test_readme_sample_output_is_what_a_first_run_prints():
    """The lines the README shows under its first command are the lines the
    server writes, timestamps and port aside."""
    from apputil import ServerProcess
    readme = read(ROOT, "README.md")
    block = readme[readme.index("    python3 pagi_ref.py examples/hello.py:app\n"):]
    shown = []
    for line in block.splitlines()[1:]:
        if not line.startswith("    # "):
            break
        shown.append(line[len("    # "):])
    stamp = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")
    expected = [stamp.sub("", l).replace(":8000", ":PORT") for l in shown if stamp.match(l)]
    with ServerProcess([os.path.join(ROOT, "pagi_ref.py"), "examples/hello.py:app",
                        "--port", "0"]) as proc:
        _, port = proc.wait_listening()
        printed = [stamp.sub("", l).replace(":%d" % port, ":PORT") for l in proc.stderr]
        assert proc.stop() == 0
    assert printed[:len(expected)] == expected, (printed, expected)
    assert all(stamp.match(l) for l in shown[:len(expected)])


# -- architecture.md's reading path --------------------------------------------------------

def section_ranges():
    """{number: (first line, last line)}: each section from the "# =====" line
    above its banner to the line before the next section's."""
    lines = read(ROOT, "pagi_ref.py").splitlines()
    starts = []
    for i, line in enumerate(lines):
        m = re.match(r"# (\d+[a-z]?)\. ", line)       # "4a." is a section beside 4
        if m and i > 0 and lines[i - 1].startswith("# ====="):
            starts.append((m.group(1), i))      # i: the "=====" line, 1-based
    ranges = {}
    for k, (number, start) in enumerate(starts):
        end = starts[k + 1][1] - 1 if k + 1 < len(starts) else None
        ranges[number] = (start, end)
    return ranges


def test_architecture_reading_path_line_ranges_match_the_banners():
    text = read(DOCS, "architecture.md")
    rows = re.findall(r"^\| (\d+)\. \| (\d+[a-z]?) [^|]+\| (\d+)-(\d+|end) \|", text, re.M)
    assert len(rows) >= 13, rows
    ranges = section_ranges()
    wrong = []
    for _step, number, first, last in rows:
        want = ranges[number]
        have = (int(first), None if last == "end" else int(last))
        if have != want:
            wrong.append("section %s: the page says %s-%s, the module %s-%s"
                         % (number, first, last, want[0], want[1] or "end"))
    assert not wrong, "docs/architecture.md's reading path is stale:\n" + "\n".join(wrong)


def fix_reading_path():
    """Rewrite architecture.md's reading-path line ranges from the banners:
    ``python3 tests/test_docs.py --fix-reading-path`` after a section moved."""
    path = os.path.join(DOCS, "architecture.md")
    ranges = section_ranges()

    def row(m):
        first, last = ranges[m.group(2)]
        return "| %s. | %s%s| %d-%s |" % (m.group(1), m.group(2), m.group(3), first, last or "end")
    text = re.sub(r"^\| (\d+)\. \| (\d+[a-z]?)( [^|]+)\| (\d+)-(\d+|end) \|", row, read(path), flags=re.M)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


# -- architecture.md's state machines ----------------------------------------------------

MACHINES_BEGIN = ("<!-- state-machines: generated from pagi_ref's transition tables by "
                  "python3 tests/test_docs.py --fix-state-machines; tests/test_docs.py "
                  "checks it -->\n")
MACHINES_END = "<!-- /state-machines -->\n"


def machines():
    """Every Machine of pagi_ref, in the order the module defines them."""
    return [v for v in vars(pagi_ref).values() if isinstance(v, pagi_ref.Machine)]


def state_machine_diagrams():
    """The plain-text diagrams of every transition table: one block per
    machine, one line per move, phases in the order the machine lists them."""
    out = []
    for machine in machines():
        out.append("```text")
        out.append("%s machine (.%s), starts in %s" % (
            machine.name, machine.attr, " or ".join(map(str, machine.initial))))
        order = machine.phases()
        width = max(len(str(p)) for p in order)
        ev_width = max(len(e) for _p, e, _n in machine.rows)
        for phase in order:
            rows = [r for r in machine.rows if r[0] == phase]
            if not rows:
                out.append("  %-*s  (final)" % (width, phase))
            for _p, event, new in rows:
                out.append("  %-*s --%s%s--> %s" % (width, phase, event,
                                                   "-" * (ev_width - len(event)), new))
        out.append("```")
        out.append("")
    return "\n".join(out)


def machines_block(text):
    start = text.index(MACHINES_BEGIN) + len(MACHINES_BEGIN)
    return start, text.index(MACHINES_END, start)


def test_architecture_state_machine_diagrams_match_the_tables():
    text = read(DOCS, "architecture.md")
    assert MACHINES_BEGIN in text, "docs/architecture.md has no generated state machines"
    start, end = machines_block(text)
    assert text[start:end] == state_machine_diagrams(), (
        "docs/architecture.md's state machines differ from pagi_ref's transition tables: "
        "run python3 tests/test_docs.py --fix-state-machines")


def fix_state_machines():
    """Rewrite architecture.md's state-machine diagrams from the tables."""
    path = os.path.join(DOCS, "architecture.md")
    text = read(path)
    start, end = machines_block(text)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text[:start] + state_machine_diagrams() + text[end:])


if __name__ == "__main__":
    import sys
    fixes = {"--fix-reading-path": fix_reading_path,
             "--fix-state-machines": fix_state_machines}
    if not sys.argv[1:] or any(a not in fixes for a in sys.argv[1:]):
        sys.exit("usage: python3 tests/test_docs.py [--fix-reading-path] [--fix-state-machines]")
    for arg in sys.argv[1:]:
        fixes[arg]()
