"""The sandboxed Jinja2 environment rule templates run in.

Templates come from the configuration; the data they render comes from events, which anyone who
can publish to the broker or reach a hook controls. So:

* Templates run in :class:`jinja2.sandbox.ImmutableSandboxedEnvironment`: no private or dunder
  attributes, no mutating methods. Touching an unsafe attribute is an error
  (:class:`~phonepush.errors.TemplateError`), not a silent empty string, so a probe like
  ``{{ cycler.__init__.__globals__ }}`` fails loudly. Event data is only ever a *value* in a
  template, never template source, so a payload holding ``{{ ... }}`` is just text.
* Missing data is lenient (:class:`jinja2.ChainableUndefined`): ``payload.action == 'single'``
  on a plain-text payload, or ``payload.a.b.c`` on JSON without ``a``, is false in a ``when`` and
  renders as the empty string in text. Rules are written against several payload shapes at once
  (Tasmota's ``Button1.Action`` and older ``ACTION``), and an event that lacks a field should
  not count as a failure. Doing something *with* missing data (calling it, comparing it with
  ``<``) is still an error. On a mapping, ``payload.items`` is the key ``items`` when the event
  has one, and missing data when it has not: a dict method is only reached by calling it
  (``payload.items()``, ``payload.get('a')``), so event keys named like methods (``items``,
  ``keys``, ``values``, ``get``) read as keys and never render ``<built-in method ...>``. One trap
  remains: on a *text* payload, a name that is also a ``str`` method (``payload.title``,
  ``payload.split``) is that method; test ``payload is mapping`` first when a source can send
  either.
* Render cost is bounded: output is cut off with an error past :data:`MAX_OUTPUT` characters,
  each ``for`` loop takes at most :data:`MAX_LOOP_ITEMS` items (the rest are skipped: a phone
  page cannot show more anyway), loops nest at most :data:`MAX_LOOP_DEPTH` deep, ``range()`` is
  capped, ``*`` and ``**`` refuse huge results, and macros, recursive loops and the
  accumulating ``namespace()`` are not available.
* Autoescape is off: text is escaped for XML where the XML is built (:mod:`phonepush.wire.cisco`).

* URL templates (:meth:`Templates.compile_url_template`: execute items written as
  ``http(s)://...``, ``background`` and ``ringtone``) URL-encode every ``{{ value }}`` they
  interpolate (``quote(value, safe="")``: ``/``, ``@``, ``:``, ``?``, ``&``, ``#`` included), so
  event data cannot add a path, a query or another host; ``{{ value | safe_url }}`` marks a value
  the rule wants raw. When the rule wrote the scheme and host literally, a rendered URL must keep
  that scheme, host and port (and user information), else rendering fails naming both hosts: the
  phone fetches the URL, so a changed host would be a request forged through the phone. When a
  tag sits inside the host (``http://phone{{ n }}.lan/``), the rendered host must start with what
  the rule wrote and hold no user information; only a ``safe_url`` value can change more there.

Extra filters: ``tojson`` (plain JSON, not HTML-escaped), ``fromjson``, ``digits`` (keep what a
``Dial:`` URI takes), ``datetime(fmt)`` (an epoch number or RFC 3339 string as local time),
``safe_url`` (a value a URL template interpolates raw).
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any, Final
from urllib.parse import quote, urlsplit

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from phonepush import jsonlimits
from phonepush.errors import ConfigError, TemplateError

__all__ = [
    "MAX_LOOP_DEPTH",
    "MAX_LOOP_ITEMS",
    "MAX_OUTPUT",
    "MAX_RANGE",
    "Expression",
    "Templates",
    "TextTemplate",
    "compile_expression",
    "compile_template",
]

MAX_OUTPUT: Final = 64 * 1024
MAX_LOOP_ITEMS: Final = 1000
MAX_LOOP_DEPTH: Final = 2
MAX_RANGE: Final = 1000
_MAX_EXPONENT: Final = 256
_BOUNDED: Final = "__phonepush_bounded"

Expression = Callable[[Mapping[str, Any]], Any]
TextTemplate = Callable[[Mapping[str, Any]], str]

# What a template can raise while rendering, beyond Jinja's own errors: Python's, from operators
# and methods applied to event data (``1 / 0``, ``'a' < 1``, ``payload['x']`` on a list).
_RENDER_ERRORS: Final = (
    jinja2.TemplateError,
    ArithmeticError,
    LookupError,
    TypeError,
    ValueError,
    AttributeError,
    RecursionError,
    # datetime.fromtimestamp() of a huge epoch: "Value too large for defined data type".
    OSError,
)
# Deeply nested source overflows Jinja's recursive parser or Python's compiler; that is a
# problem of the configured template, reported like a syntax error rather than a crash.
_TOO_COMPLEX: Final = (RecursionError, SyntaxError, MemoryError)
_FORBIDDEN: Final = {
    nodes.Macro: "macros",
    nodes.CallBlock: "call blocks",
    nodes.Extends: "extends",
    nodes.Include: "include",
    nodes.Import: "import",
    nodes.FromImport: "import",
}
_NOT_DIGITS: Final = re.compile(r"[^0-9#*]")
# A URL template's scheme and what follows "//" up to the path, query, fragment or first tag.
_WRITTEN_ORIGIN: Final = re.compile(r"(https?)://([^/?#{]*)([/?#{]?)", re.IGNORECASE)


class _MethodOrMissing(jinja2.ChainableUndefined):
    """A mapping's method reached as ``payload.items`` when the mapping has no key ``items``:
    called, it is the method; used any other way, it is missing data like any absent key."""

    __slots__ = ("_method",)

    def __init__(self, method: Callable[..., Any], obj: Any, name: str) -> None:
        super().__init__(obj=obj, name=name)
        self._method = method

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._method(*args, **kwargs)


class _RawURL(str):
    """A value marked ``| safe_url``: interpolated into a URL template as it is."""

    __slots__ = ()


def _safe_url(value: Any) -> _RawURL:
    return _RawURL("" if isinstance(value, jinja2.Undefined) else value)


def _url_value(value: Any) -> str:
    if isinstance(value, _RawURL):
        return value
    if isinstance(value, jinja2.Undefined):
        return ""
    return quote(str(value), safe="")


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def getattr(self, obj: Any, attribute: str) -> Any:
        # Event data first: a payload {"items": 3} means 3, not dict.items.
        if isinstance(obj, Mapping):
            try:
                return obj[attribute]
            except (TypeError, LookupError):
                pass
            value = super().getattr(obj, attribute)
            if callable(value) and not isinstance(value, jinja2.Undefined):
                return _MethodOrMissing(value, obj, attribute)
            return value
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        value = super().getitem(obj, argument)
        if (
            isinstance(obj, Mapping)
            and callable(value)
            and not isinstance(value, jinja2.Undefined)
            and argument not in obj
        ):
            return _MethodOrMissing(value, obj, str(argument))
        return value

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    def call_binop(
        self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any
    ) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if (
                    isinstance(seq, str | list | tuple)
                    and isinstance(times, int)
                    and len(seq) * times > MAX_OUTPUT
                ):
                    raise SecurityError(f"'*' result over {MAX_OUTPUT} items")
            return left * right
        if operator == "**":
            if isinstance(right, int | float) and abs(right) > _MAX_EXPONENT:
                raise SecurityError(f"exponent over {_MAX_EXPONENT}")
            return left**right
        return super().call_binop(context, operator, left, right)


def _range(*args: int) -> range:
    rng = range(*args)
    if len(rng) > MAX_RANGE:
        raise SecurityError(f"range() of more than {MAX_RANGE} items")
    return rng


def _bounded(iterable: Iterable[Any]) -> Iterator[Any]:
    if isinstance(iterable, jinja2.Undefined):
        return iter(())
    return itertools.islice(iterable, MAX_LOOP_ITEMS)


def _tojson(value: Any, indent: int | None = None) -> str:
    if isinstance(value, jinja2.Undefined):
        return "null"
    return json.dumps(value, ensure_ascii=False, indent=indent, default=str)


def _fromjson(value: Any) -> Any:
    return jsonlimits.loads(str(value))


def _digits(value: Any) -> str:
    return _NOT_DIGITS.sub("", str(value))


def _datetime(value: Any, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    if isinstance(value, jinja2.Undefined) or value is None or value == "":
        return ""
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, int | float):
        moment = datetime.fromtimestamp(value).astimezone()
    else:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    if moment.tzinfo is not None:
        moment = moment.astimezone()
    return moment.strftime(fmt)


def _center(value: Any, width: int = 80) -> str:
    if width > MAX_OUTPUT:
        raise SecurityError(f"center() wider than {MAX_OUTPUT}")
    return str(value).center(width)


class Templates:
    """One configured sandbox; compiles ``when`` expressions and text templates against it.

    Loading a configuration makes one and compiles all its templates with it (to report errors);
    the :class:`~phonepush.rules.book.RuleBook` then finds each one in its caches.
    """

    def __init__(self) -> None:
        self._env = _environment(finalize=None)
        # URL templates render in their own environment: one whose every {{ }} is URL-encoded.
        self._url_env = _environment(finalize=_url_value)
        # Compiling is milliseconds of Jinja code generation per source; rules often share
        # sources ("{{ payload.text }}"), and a daemon with hundreds of rules starts faster when
        # each distinct one is compiled once. Error messages still name each use (``where``).
        self._expressions: dict[str, Callable[..., Any]] = {}
        self._templates: dict[str, jinja2.Template] = {}
        self._url_templates: dict[str, jinja2.Template] = {}

    def compile_expression(self, source: str, where: str) -> Expression:
        """Compile a ``when``; the callable returns its value (``None`` for undefined)."""
        try:
            expression = self._expressions.get(source)
            if expression is None:
                expression = self._expressions[source] = self._env.compile_expression(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigError(f"{where}: {_syntax_message(exc)}") from exc
        except _TOO_COMPLEX as exc:
            raise ConfigError(f"{where}: {_complexity_message(exc)}") from exc

        def evaluate(context: Mapping[str, Any]) -> Any:
            try:
                return expression(context)
            except _RENDER_ERRORS as exc:
                raise TemplateError(f"{where}: {_render_message(exc)}") from exc

        return evaluate

    def compile_template(self, source: str, where: str) -> TextTemplate:
        """Compile a text template; the callable returns the rendered text."""
        if "{" not in source:
            # The common literal case costs nothing per event.
            return lambda context: source
        return _renderer(self._compiled(self._env, self._templates, source, where), where)

    def compile_url_template(self, source: str, where: str) -> TextTemplate:
        """Compile a template that renders a URL the phone fetches: values URL-encoded unless
        ``| safe_url``, and the scheme, host and port the source writes kept (module docstring).
        The callable raises :class:`TemplateError` when a rendered URL leaves that origin."""
        if "{" not in source:
            return lambda context: source
        render = _renderer(self._compiled(self._url_env, self._url_templates, source, where), where)
        written = _WRITTEN_ORIGIN.match(source)
        if written is None:
            return render
        scheme = written.group(1).lower()
        written_authority = written.group(2)
        literal = written.group(3) != "{"  # the authority ends before the first tag
        origin = _origin(f"{scheme}://{written_authority}") if literal else None

        def render_checked(context: Mapping[str, Any]) -> str:
            url = render(context)
            try:
                parts = urlsplit(url.strip())
                got = _origin(url.strip())
            except ValueError as exc:
                raise TemplateError(f"{where}: rendered URL is not a URL ({exc})") from None
            if parts.scheme.lower() != scheme:
                raise TemplateError(
                    f"{where}: rendered URL changed the scheme the rule wrote ({scheme}://)"
                )
            if origin is not None and got != origin:
                raise TemplateError(
                    f"{where}: rendered URL goes to {_show(got)}, not to {_show(origin)} as the"
                    " rule wrote; refused (mark only trusted values | safe_url)"
                )
            if origin is None and (
                "@" in parts.netloc or not parts.netloc.startswith(written_authority)
            ):
                # The rule wrote only the start of the host: the rest may be filled in, but
                # user information in front of it would make the written part a user name.
                raise TemplateError(
                    f"{where}: rendered URL goes to {_show(got)}, not to a host starting"
                    f" {written_authority!r} as the rule wrote; refused"
                )
            return url

        return render_checked

    def _compiled(
        self,
        env: jinja2.Environment,
        cache: dict[str, jinja2.Template],
        source: str,
        where: str,
    ) -> jinja2.Template:
        try:
            template = cache.get(source)
            if template is None:
                tree = env.parse(source)
                _restrict(tree, where)
                template = cache[source] = env.from_string(tree)
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigError(f"{where}: {_syntax_message(exc)}") from exc
        except _TOO_COMPLEX as exc:
            raise ConfigError(f"{where}: {_complexity_message(exc)}") from exc
        return template


def _environment(finalize: Callable[[Any], Any] | None) -> _Sandbox:
    env = _Sandbox(
        autoescape=False,
        undefined=jinja2.ChainableUndefined,
        keep_trailing_newline=True,
        cache_size=0,
        finalize=finalize,
    )
    for name in ("lipsum", "cycler", "joiner", "namespace"):
        env.globals.pop(name, None)
    env.globals["range"] = _range
    env.globals[_BOUNDED] = _bounded
    env.filters.update(
        tojson=_tojson,
        fromjson=_fromjson,
        digits=_digits,
        datetime=_datetime,
        center=_center,
        safe_url=_safe_url,
    )
    return env


def _renderer(template: jinja2.Template, where: str) -> TextTemplate:
    def render(context: Mapping[str, Any]) -> str:
        parts: list[str] = []
        size = 0
        try:
            for chunk in template.generate(context):
                size += len(chunk)
                if size > MAX_OUTPUT:
                    raise TemplateError(f"{where}: output longer than {MAX_OUTPUT} characters")
                parts.append(chunk)
        except _RENDER_ERRORS as exc:
            raise TemplateError(f"{where}: {_render_message(exc)}") from exc
        return "".join(parts)

    return render


# (user information, host, port) of an http(s) URL; raises ValueError for a bad port.
_Origin = tuple[str | None, str | None, str | None, int | None]


def _origin(url: str) -> _Origin:
    parts = urlsplit(url)
    host = parts.hostname
    return parts.username, parts.password, host, parts.port


def _show(origin: _Origin) -> str:
    _user, _password, host, port = origin
    return repr(f"{host or ''}{f':{port}' if port is not None else ''}")


def _restrict(tree: nodes.Template, where: str) -> None:
    """Refuse what rule templates do not need and could spin on; bound every loop."""
    for node in tree.find_all(tuple(_FORBIDDEN)):
        raise ConfigError(f"{where}: {_FORBIDDEN[type(node)]} are not available in rule templates")

    def visit(node: nodes.Node, depth: int) -> None:
        if isinstance(node, nodes.For):
            if node.recursive:
                raise ConfigError(f"{where}: recursive loops are not available in rule templates")
            depth += 1
            if depth > MAX_LOOP_DEPTH:
                raise ConfigError(f"{where}: loops nest at most {MAX_LOOP_DEPTH} deep")
            node.iter = nodes.Call(
                nodes.Name(_BOUNDED, "load", lineno=node.lineno),
                [node.iter],
                [],
                None,
                None,
                lineno=node.lineno,
            )
        for child in node.iter_child_nodes():
            visit(child, depth)

    visit(tree, 0)


def _complexity_message(exc: BaseException) -> str:
    return f"template nests too deeply to compile ({type(exc).__name__}: {exc})"


def _syntax_message(exc: jinja2.TemplateSyntaxError) -> str:
    return f"{exc.message} (template line {exc.lineno})"


def _render_message(exc: BaseException) -> str:
    if isinstance(exc, SecurityError):
        return f"not allowed: {exc}"
    return f"{type(exc).__name__}: {exc}" if not isinstance(exc, jinja2.TemplateError) else str(exc)


def compile_expression(
    source: str, where: str, *, templates: Templates | None = None
) -> Expression:
    """Compile a ``when`` expression. Compile errors raise :class:`ConfigError` naming ``where``;
    the returned callable raises :class:`TemplateError` naming ``where``."""
    return (templates or Templates()).compile_expression(source, where)


def compile_template(
    source: str, where: str, *, templates: Templates | None = None
) -> TextTemplate:
    """Compile a text template (message, URI, dedupe key). Errors as :func:`compile_expression`."""
    return (templates or Templates()).compile_template(source, where)
