"""The Jinja2 sandbox rule templates run in: what renders, what fails, what cannot escape."""

from __future__ import annotations

import pytest

from phonepush.errors import ConfigError, TemplateError
from phonepush.templates import (
    MAX_LOOP_ITEMS,
    MAX_OUTPUT,
    Templates,
    compile_expression,
    compile_template,
)

CONTEXT = {
    "payload": {"action": "single", "alerts": [{"name": "a"}, {"name": "b"}], "n": "+1 (555) 01"},
    "topic": "zigbee2mqtt/front door/action",
    "headers": {"user-agent": "Alertmanager/0.27"},
    "source": "mqtt",
}

# Published Jinja2 server-side template injection payloads (PayloadsAllTheThings, HackTricks).
SSTI = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__.__mro__[2].__subclasses__()[40]('/etc/passwd').read() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ joiner.__init__.__globals__.os.popen('id').read() }}",
    "{{ namespace.__init__.__globals__.os.popen('id').read() }}",
    "{{ self.__init__.__globals__ }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os }}",
    "{{ config.items() }}",
    "{{ config.__class__.__init__.__globals__['os'].popen('id').read() }}",
    "{{ lipsum.__globals__ }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ request.application.__globals__.__builtins__.__import__('os').popen('id').read() }}",
    "{{ url_for.__globals__.os.popen('id').read() }}",
    "{{ get_flashed_messages.__globals__.__builtins__.open('/etc/passwd').read() }}",
    "{% for x in ().__class__.__base__.__subclasses__() %}{{ x }}{% endfor %}",
    "{{ payload.__class__.__base__.__subclasses__() }}",
    "{{ topic.__class__.__mro__ }}",
    "{{ (topic|attr('__class__')) }}",
    "{{ topic|attr('\\x5f\\x5fclass\\x5f\\x5f') }}",
    "{{ payload['__class__'] }}",
    "{{ ''.format.__globals__ }}",
    "{{ '{0.__class__}'.format(topic) }}",
    "{{ payload.update({'action': 'x'}) }}{{ payload.action }}",
    "{{ payload.alerts.append(1) }}",
]


@pytest.mark.parametrize("source", SSTI)
def test_published_ssti_payloads_do_not_escape_the_sandbox(source: str) -> None:
    render = compile_template(source, "rules[x].message.text")
    try:
        output = render(CONTEXT)
    except TemplateError as exc:
        assert str(exc).startswith("rules[x].message.text: ")
        return
    # Whatever rendered instead holds nothing reached through the attempted escape.
    assert output.strip() in ("", "x", "single", "None")
    for leak in ("class", "uid=", "root:", "function", "module", "builtins"):
        assert leak not in output


def test_unsafe_attribute_is_an_error_not_a_silent_empty_string() -> None:
    render = compile_template("{{ topic.__class__ }}", "w")
    with pytest.raises(TemplateError, match="not allowed: access to attribute '__class__'"):
        render(CONTEXT)


def test_event_data_is_never_evaluated_as_a_template() -> None:
    render = compile_template("Got: {{ payload }}", "w")
    assert render({"payload": "{{ 7 * 7 }}{% for x in range(3) %}x{% endfor %}"}) == (
        "Got: {{ 7 * 7 }}{% for x in range(3) %}x{% endfor %}"
    )


def test_missing_data_is_false_in_when_and_empty_in_text() -> None:
    when = compile_expression("payload.action == 'single'", "w")
    assert when({"payload": "single"}) is False  # text payload: no .action
    assert when(CONTEXT) is True
    assert not compile_expression("payload.a.b.c", "w")(CONTEXT)
    text = compile_template("[{{ payload.commonLabels.alertname }}]", "w")
    assert text({"payload": {}}) == "[]"
    assert text({"payload": "plain text"}) == "[]"


def test_render_errors_name_where_they_happened() -> None:
    with pytest.raises(TemplateError, match=r"^rules\[a\]\.when: ZeroDivisionError"):
        compile_expression("1 / 0", "rules[a].when")(CONTEXT)
    with pytest.raises(TemplateError, match=r"^rules\[a\]\.dedupe: .*undefined"):
        compile_template("{{ nothing() }}", "rules[a].dedupe")(CONTEXT)


def test_syntax_errors_are_config_errors_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^rules\[a\]\.when: unexpected"):
        compile_expression("payload ==", "rules[a].when")
    with pytest.raises(ConfigError, match=r"^rules\[a\]\.message\.text: .*line 2"):
        compile_template("ok\n{% for %}", "rules[a].message.text")


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "macros"),
        ("{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}", "recursive loops"),
        ("{% include 'x' %}", "include"),
        (
            "{% for a in range(2) %}{% for b in range(2) %}{% for c in range(2) %}"
            "{% endfor %}{% endfor %}{% endfor %}",
            "loops nest at most 2 deep",
        ),
    ],
)
def test_constructs_that_could_spin_are_refused_at_compile_time(source: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        compile_template(source, "w")


@pytest.mark.parametrize(
    "source",
    [
        "{{ 'x' * 1000000 }}",
        "{{ [0] * 1000000 }}",
        "{{ 9 ** 9999999 }}",
        "{{ range(10000000) | list }}",
        "{{ 'x' | center(100000000) }}",
        "{% for i in range(1000) %}{% for j in range(1000) %}xx{% endfor %}{% endfor %}",
    ],
)
def test_render_cost_is_bounded(source: str) -> None:
    with pytest.raises(TemplateError):
        compile_template(source, "w")(CONTEXT)


def test_output_just_under_the_cap_renders() -> None:
    render = compile_template("{{ 'x' * n }}", "w")
    assert len(render({"n": MAX_OUTPUT})) == MAX_OUTPUT


def test_loops_take_at_most_max_loop_items() -> None:
    render = compile_template("{% for x in payload %}.{% endfor %}", "w")
    assert render({"payload": list(range(MAX_LOOP_ITEMS * 3))}) == "." * MAX_LOOP_ITEMS


def test_filters() -> None:
    templates = Templates()
    render = templates.compile_template(
        "{{ payload | tojson }}|{{ payload.n | digits }}|{{ '{\"a\": 1}' | fromjson }}", "w"
    )
    payload = {"n": "+1 (555) 01#", "t": "<b>&é"}
    assert render({"payload": payload}) == (
        '{"n": "+1 (555) 01#", "t": "<b>&é"}|155501#|{\'a\': 1}'
    )
    date = templates.compile_template("{{ payload | datetime('%Y-%m-%d') }}", "w")
    assert date({"payload": "2024-05-06T07:08:09Z"}) in ("2024-05-06", "2024-05-07", "2024-05-05")
    assert date({"payload": ""}) == ""


def test_text_is_not_html_escaped_and_literals_pass_through() -> None:
    assert compile_template("{{ payload }}", "w")({"payload": "<a & b>"}) == "<a & b>"
    assert compile_template("Play:Chime.raw", "w")({}) == "Play:Chime.raw"
