"""Write docs/api.md, the API reference, from lightws's docstrings.

    python docs/gen_api.py            # rewrite docs/api.md
    python docs/gen_api.py --check    # exit 1 if docs/api.md is out of date

Every name in ``lightws.__all__`` and in the ``__all__`` of ``lightws.streaming`` and
``lightws.demos`` gets a section: its signature, its docstring, and for classes their
public methods and properties; for dataclasses every field with its type, default and
``#:`` comment; for enums every member. Signatures of the native classes come from ``_lightws.pyi``, which carries
the types the compiled module cannot report.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import inspect
import re
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import lightws
import lightws.demos
import lightws.streaming

OUT = Path(__file__).with_name("api.md")

GROUPS: list[tuple[str, list[str]]] = [
    ("Server and configuration", ["run", "Server", "Config", "Stats", "Rates"]),
    ("Handshake", ["HandshakeFunc", "Handler", "Request", "Response", "Headers"]),
    ("Connections and messages", ["Connection", "Message"]),
    ("Client", ["connect"]),
    ("Constants", ["Opcode", "CloseCode", "LogLevel"]),
    (
        "Exceptions",
        [
            "LightwsError",
            "ConnectionClosed",
            "ConnectionClosedOK",
            "ConnectionClosedError",
            "ProtocolError",
            "PayloadTooBig",
            "InvalidHandshake",
        ],
    ),
]


#: Public modules whose names are not re-exported by ``lightws`` itself.
SUBMODULES: list[tuple[str, ModuleType]] = [
    ("Streaming", lightws.streaming),
    ("Demos", lightws.demos),
]


def stub_signatures() -> dict[str, str]:
    """``"Class.method"`` -> the typed signature written in ``_lightws.pyi``."""
    path = Path(lightws.__file__).with_name("_lightws.pyi")
    tree = ast.parse(path.read_text())
    sigs: dict[str, str] = {}
    for cls in tree.body:
        if not isinstance(cls, ast.ClassDef):
            continue
        for node in cls.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = ast.unparse(node.args)
                ret = f" -> {ast.unparse(node.returns)}" if node.returns else ""
                prefix = "async " if isinstance(node, ast.AsyncFunctionDef) else ""
                sigs[f"{cls.name}.{node.name}"] = f"{prefix}({args}){ret}"
    return sigs


STUBS = stub_signatures()


def field_comments(cls: type) -> dict[str, str]:
    """The ``#:`` comment above each field of a class body; fields on consecutive lines
    share the comment above the first (``sock_read_buffer``/``sock_write_buffer``)."""
    comments: dict[str, str] = {}
    pending: list[str] = []
    shared = ""
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        name, colon, _ = stripped.partition(":")
        if colon and name.isidentifier() and not stripped.startswith(("def ", "class ")):
            if pending:
                shared, pending = " ".join(pending), []
            comments[name] = shared
        else:
            pending, shared = [], ""
    return comments


def module_comment(module: ModuleType, name: str) -> str:
    """The ``#:`` comment above a module-level assignment ``name = ...``."""
    lines = inspect.getsource(module).splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"{name} =") or line.startswith(f"{name}:"):
            above: list[str] = []
            j = i - 1
            while j >= 0 and lines[j].startswith("#:"):
                above.insert(0, lines[j][2:].strip())
                j -= 1
            return " ".join(above)
    return ""


SECTION = re.compile(r"^(Args|Arguments|Attributes|Raises|Returns|Yields):$")
FIELD = re.compile(r"^    (\*{0,2}[\w.]+): (.*)$")
ROLE = re.compile(r":(?:class|meth|func|mod|data|attr|exc):`~?([^`]+)`")


def doc(obj: Any) -> str:
    return markdown(inspect.getdoc(obj) or "")


def markdown(text: str) -> str:
    """reST-ish docstring text as Markdown: ``x`` -> `x`, roles dropped, Google-style
    sections (``Attributes:`` + indented ``name: text``) as bullet lists."""
    lines: list[str] = []
    for line in text.strip().splitlines():
        line = ROLE.sub(r"`\1`", line).replace("``", "`")
        if SECTION.match(line):
            lines += [f"**{line}**", ""]
        elif (field := FIELD.match(line)) and lines and (lines[-1] == "" or lines[-1][:2] == "- "):
            lines.append(f"- `{field.group(1)}`: {field.group(2)}")
        elif line.startswith("        ") and lines and lines[-1].startswith("- "):
            lines[-1] += " " + line.strip()  # continuation of a field
        else:
            lines.append(line)
    return "\n".join(lines)


class _Bare(str):
    """An annotation shown without quotes in a signature."""

    def __repr__(self) -> str:
        return str(self)


def format_signature(sig: inspect.Signature) -> str:
    params = [
        p.replace(annotation=_Bare(p.annotation)) if isinstance(p.annotation, str) else p
        for p in sig.parameters.values()
    ]
    ret = sig.return_annotation
    if isinstance(ret, str):
        ret = _Bare(ret)
    return str(sig.replace(parameters=params, return_annotation=ret))


def signature(owner: str, name: str, obj: Any) -> str:
    stub = STUBS.get(f"{owner}.{name}")
    if stub is not None:
        return stub
    try:
        return format_signature(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


def default_repr(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
        return (
            f"`{value.__class__.__name__}.{value.name}`"
            if isinstance(value, enum.Enum)
            else f"`{value!r}`"
        )
    if f.default_factory is not dataclasses.MISSING:
        return f"`{getattr(f.default_factory, '__name__', 'factory')}()`"
    return "required"


def type_name(annotation: Any) -> str:
    return (
        annotation
        if isinstance(annotation, str)
        else getattr(annotation, "__name__", repr(annotation))
    )


def members(cls: type) -> list[str]:
    """Public methods and properties defined by ``cls`` (not inherited from object)."""
    out: list[str] = []
    is_stub_class = cls.__module__ == "lightws._lightws"
    for name, attr in sorted(vars(cls).items()):
        if name.startswith("_"):
            continue  # dunders are described by the class docstring (async with/for)
        if isinstance(attr, (property,)) or type(attr).__name__ == "getset_descriptor":
            text = " ".join(doc(attr).split()) or "—"
            out.append(f"- **`{name}`** (property): {text}")
        elif callable(attr) or isinstance(attr, (staticmethod, classmethod)):
            fn = getattr(cls, name)
            sig = signature(cls.__name__, name, fn)
            prefix = ""
            if sig.startswith("async "):
                prefix, sig = "async ", sig.removeprefix("async ")
            elif not is_stub_class and inspect.iscoroutinefunction(fn):
                prefix = "async "
            text = doc(fn) if doc(fn) != doc(type(fn)) else ""
            body = textwrap.indent(text, "  ") if text else "  —"
            out.append(f"- **`{prefix}{name}{sig}`**\n\n{body}")
    return out


def section(name: str, obj: Any, module: ModuleType) -> str:
    parts = [f"### `{module.__name__}.{name}`"]
    if isinstance(obj, type) and issubclass(obj, enum.Enum):
        parts.append(f"`class {name}({obj.__mro__[1].__name__})`\n\n{doc(obj)}")
        parts.append("\n".join(f"- `{m.name}` = `{m.value}`" for m in obj))
    elif isinstance(obj, type) and dataclasses.is_dataclass(obj):
        parts.append(f"`@dataclass class {name}`\n\n{doc(obj)}")
        comments = field_comments(obj)
        rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(obj):
            meaning = comments.get(f.name, "").replace("|", "\\|")
            rows.append(f"| `{f.name}` | `{type_name(f.type)}` | {default_repr(f)} | {meaning} |")
        parts.append("\n".join(rows))
        parts.extend(members(obj))
    elif isinstance(obj, type):
        bases = ", ".join(b.__name__ for b in obj.__bases__ if b is not object)
        stub = STUBS.get(f"{name}.__new__") or STUBS.get(f"{name}.__init__")
        if stub is not None:  # a native class: its constructor as typed in the stub
            sig = re.sub(r"^\((cls|self)(, )?", "(", stub).split(" -> ")[0]
        elif "__init__" in vars(obj):
            sig = signature(name, "__init__", obj)
        else:
            sig = ""
        parts.append(f"`class {name}{sig}`" + (f" — subclass of `{bases}`" if bases else ""))
        parts.append(doc(obj))
        parts.extend(members(obj))
    elif inspect.isfunction(inspect.unwrap(obj)):
        prefix = "async def" if inspect.iscoroutinefunction(obj) else "def"
        sig = format_signature(inspect.signature(obj))
        parts.append(f"`{prefix} {name}{sig}`\n\n{doc(obj)}")
    else:  # a type alias
        where = sys.modules[lightws.Config.__module__]
        alias = str(obj).replace("collections.abc.", "").replace("'", "")
        parts.append(f"Type alias: `{alias}`\n\n{markdown(module_comment(where, name))}")
    return "\n\n".join(p for p in parts if p)


def render() -> str:
    listed = [n for _, names in GROUPS for n in names]
    missing = sorted(set(lightws.__all__) - set(listed))
    groups = [*GROUPS, ("Other", missing)] if missing else GROUPS
    out = [
        "# lightws API reference",
        "",
        "<!-- Generated by docs/gen_api.py from the docstrings; do not edit by hand. -->",
        "",
        f"lightws {lightws.__version__}. Everything below is importable from `lightws` "
        "(and the demo helpers from `lightws.demos`).",
        "",
        doc(lightws).split("\n\n")[0],
        "",
    ]
    for title, names in groups:
        out.append(f"## {title}\n")
        for name in names:
            out.append(section(name, getattr(lightws, name), lightws) + "\n")
    for title, module in SUBMODULES:
        out.append(f"## {title} (`{module.__name__}`)\n")
        out.append(doc(module) + "\n")
        for name in sorted(module.__all__):
            out.append(section(name, getattr(module, name), module) + "\n")
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if api.md is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        if OUT.read_text() != text:
            print(f"{OUT} is out of date: run python docs/gen_api.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
