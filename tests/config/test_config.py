"""Config loading: good files load, broken ones are refused with file, line and key path."""

from pathlib import Path

import pytest

from proxy.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent.parent
BASE = """\
upstreams:
  openrouter: {base_url: https://openrouter.ai/api/v1}
models:
  cheap: {chain: [a/one, a/two]}
"""


def test_shipped_config_loads():
    config = load_config(ROOT / "config.yaml")
    assert [m.model for m in config.models["cheap"].chain] == [
        "mistralai/mistral-7b-instruct",
        "meta-llama/llama-3.1-8b-instruct",
        "gpt-4o-mini",
    ]
    assert config.models["cheap"].chain[2].upstream == "openai"
    assert config.upstreams["openrouter"].headers["X-Title"] == "Example App"
    assert config.upstreams["openai"].flavour == "openai"
    assert config.retry.cooldown.failures == 3


def test_minimal_config_gets_defaults():
    config = parse_config(BASE)
    assert config.listen.port == 8080
    assert config.upstreams["openrouter"].api_key_env == "OPENROUTER_API_KEY"
    assert config.retry.attempts_per_model == 2
    assert config.allow_direct_models is True
    assert (config.state.backend, config.state.prefix, config.state.on_state_error) == (
        "local",
        "orproxy:",
        "fail_closed",
    )


@pytest.mark.parametrize(
    "extra, line, expected",
    [
        (
            "  auto: {route: [{to: nope}]}\n",
            5,
            "models.auto.route[0].to: routes to 'nope', which is not a virtual model",
        ),
        (
            "  a: {route: [{to: b}]}\n  b: {route: [{when: {task: x}, to: a}, {to: cheap}]}\n",
            6,
            "models.b.route[0].to: routing loop: a -> b -> a",
        ),
        ("  selfish: {route: [{to: selfish}]}\n", 5, "models.selfish.route[0].to: routing loop: selfish -> selfish"),
        ("  auto: {route: [{when: {stream: true}, to: cheap}]}\n", 5, "models.auto.route: has no catch-all rule"),
        (
            "  auto: {route: [{to: cheap}, {when: {stream: true}, to: cheap}]}\n",
            5,
            "models.auto.route[0]: matches every request, so the rules after it can never match",
        ),
        (
            "  x: {chain: [{model: m/m, upstream: nowhere}]}\n",
            5,
            "models.x.chain[0].upstream: unknown upstream 'nowhere'",
        ),
        ("  x: {chain: []}\n", 5, "models.x: `chain` must list at least one model"),
        ("  x: {chain: [a/b], route: [{to: cheap}]}\n", 5, "models.x: needs exactly one of `chain`"),
        ("  x: {}\n", 5, "models.x: needs exactly one of `chain`"),
        ("  x: {chian: [a/b]}\n", 5, "models.x.chian: unknown key"),
        (
            "  x: {route: [{when: {last_user_message_matches: '(('}, to: cheap}, {to: cheap}]}\n",
            5,
            "models.x.route[0].when.last_user_message_matches: invalid regular expression",
        ),
        (
            "  x: {route: [{when: {prompt_tokens_over: -1}, to: cheap}, {to: cheap}]}\n",
            5,
            "models.x.route[0].when.prompt_tokens_over: Input should be greater than or equal to 0",
        ),
        ("  cheap: {chain: [b/b]}\n", 5, "models.cheap: duplicate key (first defined on line 4)"),
    ],
)
def test_broken_models_are_refused_with_line_and_path(extra, line, expected):
    with pytest.raises(ConfigError) as caught:
        parse_config(BASE + extra, "edited.yaml")
    rendered = str(caught.value).splitlines()
    assert any(r.startswith(f"edited.yaml:{line}: {expected}") for r in rendered), rendered


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "upstreams: {openrouter: {base_url: ftp://x}}\nmodels: {a: {chain: [x/y]}}\n",
            "cfg.yaml:1: upstreams.openrouter.base_url: must be an http:// or https:// URL",
        ),
        ("models: {a: {chain: [x/y]}}\n", "cfg.yaml:1: upstreams: is required"),
        (
            BASE + "retry: {attempts_per_model: 0}\n",
            "cfg.yaml:5: retry.attempts_per_model: Input should be greater than or equal to 1",
        ),
        (
            BASE + "retry:\n  cooldown: {failures: many}\n",
            "cfg.yaml:6: retry.cooldown.failures: Input should be a valid integer",
        ),
        (BASE + "listen: {port: 99999}\n", "cfg.yaml:5: listen.port: Input should be less than or equal to 65535"),
        (BASE + "direct_upstream: elsewhere\n", "cfg.yaml:5: direct_upstream: names upstream 'elsewhere'"),
        (
            BASE + "state:\n  backend: redis\n",
            "cfg.yaml:5: state: `backend: redis` needs exactly one of `url`",
        ),
        (
            BASE + "state:\n  backend: redis\n  url: http://127.0.0.1:6379\n",
            "cfg.yaml:7: state.url: must be a redis://, rediss:// or unix:// URL",
        ),
        (
            BASE + "state:\n  on_state_error: open\n",
            "cfg.yaml:6: state.on_state_error: Input should be 'fail_closed' or 'local'",
        ),
        ("models: [a\n", "cfg.yaml:2: <root>: invalid YAML"),
        ("- just\n- a list\n", "cfg.yaml:1: <root>: the config must be a YAML mapping"),
    ],
)
def test_broken_top_level_is_refused(text, expected):
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "cfg.yaml")
    assert any(line.startswith(expected) for line in str(caught.value).splitlines()), str(caught.value)


def test_every_problem_is_reported_at_once():
    text = BASE + "  a: {route: [{to: nope}]}\n  b: {chain: [{model: m/m, upstream: zz}]}\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "c.yaml")
    assert len(caught.value.issues) == 2


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="there is no config file here"):
        load_config(tmp_path / "absent.yaml")


def test_rule_tasks_are_normalised():
    config = parse_config(
        BASE + "  auto: {route: [{when: {task: [Code_Generation, ' x ']}, to: cheap}, {to: cheap}]}\n"
    )
    assert config.models["auto"].route[0].when.task == ("code_generation", "x")


def test_a_broken_section_does_not_hide_a_dangling_rule():
    text = BASE + "  auto: {route: [{to: qualty}]}\nretry: {attempts_per_model: 0}\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "c.yaml")
    assert str(caught.value).splitlines() == [
        "c.yaml:5: models.auto.route[0].to: routes to 'qualty', which is not a virtual model (known: auto, cheap)",
        "c.yaml:6: retry.attempts_per_model: Input should be greater than or equal to 1",
    ]
