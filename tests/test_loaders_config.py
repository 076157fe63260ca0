"""Dataset loaders (CSV, JSONL), the settings tree from the environment, and dotted overrides."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError
from pydantic_settings import SettingsError

from stream_distill.app import with_overrides
from stream_distill.config import KafkaSettings, ServeSettings, Settings
from stream_distill.data.loaders import load_labelled
from stream_distill.events import Turn


def _user(text: str) -> tuple[Turn, ...]:
    return (Turn(role="user", text=text),)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _error_at(path: Path, line: int) -> str:
    return "(?s)^" + re.escape(f"{path}:{line}: ")


# -- CSV -------------------------------------------------------------------------------------


def test_csv_rows(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "d.csv",
        'text,label,source\nhello there,greet,web\n"refund, please",refund,\n  café ?  , q ,x\n',
    )
    assert load_labelled(path) == [
        (_user("hello there"), "greet"),
        (_user("refund, please"), "refund"),
        (_user("café ?"), "q"),
    ]


def test_csv_columns_in_any_order_and_upper_case_suffix(tmp_path: Path) -> None:
    path = _write(tmp_path / "D.CSV", "label,text\ngreet,hi\n")
    assert load_labelled(path) == [(_user("hi"), "greet")]


def test_csv_with_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes("text,label\nhi,greet\n".encode("utf-8-sig"))
    assert load_labelled(path) == [(_user("hi"), "greet")]


@pytest.mark.parametrize("content", ["", "text,intent\nhi,greet\n", "words\nhi\n"])
def test_csv_without_text_and_label_columns(tmp_path: Path, content: str) -> None:
    path = _write(tmp_path / "d.csv", content)
    with pytest.raises(ValueError, match=re.escape(f"{path}: CSV needs the columns text,label")):
        load_labelled(path)


@pytest.mark.parametrize(
    ("content", "line"),
    [
        ("text,label\nhi,greet\n,refund\n", 3),
        ("text,label\nhi,greet\nbye,\n", 3),
        ("text,label\nhi,greet\n   ,  \n", 3),
        ("text,label\nhi\n", 2),  # short row: no label at all
        ("text,label\n\nhi,greet\n\n,refund\n", 5),  # blank lines still count as lines
        ('text,label\n"two\nlines",greet\nbye,\n', 4),  # so do newlines inside quotes
    ],
)
def test_csv_bad_row_names_file_and_line(tmp_path: Path, content: str, line: int) -> None:
    path = _write(tmp_path / "d.csv", content)
    with pytest.raises(ValueError, match=_error_at(path, line) + "empty text or label"):
        load_labelled(path)


def test_csv_multi_line_text_is_kept(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", 'text,label\n"two\nlines",greet\n')
    assert load_labelled(path) == [(_user("two\nlines"), "greet")]


# -- JSONL -----------------------------------------------------------------------------------


def test_jsonl_both_shapes(tmp_path: Path) -> None:
    rows = [
        {"text": "hi", "label": "greet"},
        {
            "turns": [
                {"role": "user", "text": "my card"},
                {"role": "agent", "text": "which card?"},
                {"role": "user", "text": "the blue one"},
            ],
            "intent": "card",
        },
        {"turns": [{"role": "user", "text": "bye"}], "label": "goodbye"},
        {"text": 42, "label": 7},  # scalars are read as text
    ]
    path = _write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n   \n")
    assert load_labelled(path) == [
        (_user("hi"), "greet"),
        (
            (
                Turn(role="user", text="my card"),
                Turn(role="agent", text="which card?"),
                Turn(role="user", text="the blue one"),
            ),
            "card",
        ),
        (_user("bye"), "goodbye"),
        (_user("42"), "7"),
    ]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".ndjson", ".JSONL"])
def test_jsonl_suffixes(tmp_path: Path, suffix: str) -> None:
    path = _write(tmp_path / f"d{suffix}", '{"text": "hi", "label": "greet"}\n')
    assert load_labelled(path) == [(_user("hi"), "greet")]


def test_unknown_suffix(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.txt", "hi\tgreet\n")
    with pytest.raises(ValueError, match=r"expected a \.csv or \.jsonl file"):
        load_labelled(path)


GOOD = '{"text": "ok", "label": "greet"}'


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("{not json", "Expecting property name"),
        ('{"text": "hi"}', "'label'"),
        ('{"label": "greet"}', "'text'"),
        ('{"turns": [{"role": "user", "text": "hi"}]}', "'label'"),
        ('["hi", "greet"]', ""),
        ('"just a string"', ""),
        ("12", ""),
        ('{"turns": [{"role": "robot", "text": "hi"}], "intent": "x"}', "role"),
        ('{"turns": [], "intent": "x"}', "the last turn must be a user turn with a label"),
        (
            '{"turns": [{"role": "user", "text": "hi"}, {"role": "agent", "text": "yo"}],'
            ' "intent": "x"}',
            "the last turn must be a user turn with a label",
        ),
        ('{"text": "hi", "label": ""}', "the last turn must be a user turn with a label"),
        ('{"text": "hi", "label": null}', "the last turn must be a user turn with a label"),
        ('{"turns": [{"role": "user", "text": "hi"}], "intent": null, "label": null}', "label"),
        ('{"text": null, "label": "greet"}', "empty text"),
        ('{"text": "  ", "label": "greet"}', "empty text"),
    ],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path: Path, bad: str, reason: str) -> None:
    path = _write(tmp_path / "d.jsonl", f"{GOOD}\n\n{bad}\n{GOOD}\n")
    with pytest.raises(ValueError, match=_error_at(path, 3) + ".*" + re.escape(reason)):
        load_labelled(path)


# -- settings --------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SD_ variable from the outside world leaks into these tests."""
    for key in list(os.environ):
        if key.upper().startswith("SD_"):
            monkeypatch.delenv(key)


def test_defaults() -> None:
    s = Settings()
    assert s.kafka.bootstrap_servers is None
    assert s.kafka.topic_prefix == "sd."
    assert s.serve.port == 8000
    assert s.serve.feedback_tokens == {}
    assert s.trainer.checkpoint_dir == Path(".sd/trainer")
    assert s.model.student_layers == (0, 5)


def test_env_vars_reach_nested_sections(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SD_KAFKA__BOOTSTRAP_SERVERS", "kafka-1:9092,kafka-2:9092")
    monkeypatch.setenv("SD_SERVE__PORT", "8081")
    monkeypatch.setenv("SD_TRAINER__LR", "0.001")
    monkeypatch.setenv("SD_MODEL__STUDENT_LAYERS", "[0, 2, 5]")
    monkeypatch.setenv("SD_DATA_DIR", "/var/lib/sd")
    s = Settings()
    assert s.kafka.bootstrap_servers == "kafka-1:9092,kafka-2:9092"
    assert s.serve.port == 8081
    assert s.trainer.lr == 0.001
    assert s.model.student_layers == (0, 2, 5)
    assert s.data_dir == Path("/var/lib/sd")


def test_feedback_tokens_from_json_env_are_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SD_SERVE__FEEDBACK_TOKENS", '{"alice": "s3cret-a", "bob": "s3cret-b"}')
    monkeypatch.setenv("SD_SERVE__ADMIN_TOKEN", "adm1n-tok")
    monkeypatch.setenv("SD_KAFKA__SASL_PASSWORD", "kafka-pw")
    s = Settings()
    tokens = s.serve.feedback_tokens
    assert set(tokens) == {"alice", "bob"}
    assert all(isinstance(t, SecretStr) for t in tokens.values())
    assert tokens["alice"].get_secret_value() == "s3cret-a"
    assert s.serve.admin_token is not None
    assert s.serve.admin_token.get_secret_value() == "adm1n-tok"
    assert s.kafka.sasl_password is not None
    assert s.kafka.sasl_password.get_secret_value() == "kafka-pw"
    for shown in (repr(s), str(s), repr(s.serve), s.model_dump_json(), str(s.model_dump())):
        for secret in ("s3cret-a", "s3cret-b", "adm1n-tok", "kafka-pw"):
            assert secret not in shown
    assert "**********" in repr(s.serve)


def test_bad_json_in_env_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SD_SERVE__FEEDBACK_TOKENS", "alice=s3cret")
    with pytest.raises(SettingsError, match='field "serve"'):
        Settings()


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("SD_SERVE__PORT", "70000"),
        ("SD_KAFKA__SECURITY_PROTOCOL", "CARRIER_PIGEON"),
        ("SD_TRAINER__ALPHA", "1.5"),
    ],
)
def test_invalid_env_values_are_rejected(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ValidationError):
        Settings()


def test_unknown_keys_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        Settings.model_validate({"kafak": {}})
    with pytest.raises(ValidationError, match=r"kafka\.bootstrap"):
        Settings.model_validate({"kafka": {"bootstrap": "h:1"}})
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        ServeSettings(prot=1)  # type: ignore[call-arg]
    monkeypatch.setenv("SD_KAFKA__BOOTSTRAP", "typo:9092")
    with pytest.raises(ValidationError, match=r"kafka\.bootstrap"):
        Settings()


def test_settings_tree_root_is_frozen() -> None:
    s = Settings()
    with pytest.raises(ValidationError, match="frozen"):
        s.data_dir = Path("/elsewhere")  # type: ignore[misc]


# -- with_overrides --------------------------------------------------------------------------


def test_dotted_overrides() -> None:
    base = Settings()
    s = with_overrides(
        base,
        {
            "kafka.bootstrap_servers": "h:9092",
            "serve.port": "9001",  # validated and coerced like any input
            "trainer.lr": 0.01,
            "data_dir": "/srv/sd",
        },
    )
    assert s.kafka.bootstrap_servers == "h:9092"
    assert s.serve.port == 9001
    assert s.trainer.lr == 0.01
    assert s.data_dir == Path("/srv/sd")
    assert base.kafka.bootstrap_servers is None and base.serve.port == 8000  # a copy
    assert s.model_dump(exclude={"kafka", "serve", "trainer", "data_dir"}) == base.model_dump(
        exclude={"kafka", "serve", "trainer", "data_dir"}
    )


def test_none_overrides_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SD_KAFKA__BOOTSTRAP_SERVERS", "from-env:9092")
    s = with_overrides(Settings(), {"kafka.bootstrap_servers": None, "serve.port": None})
    assert s.kafka.bootstrap_servers == "from-env:9092"
    assert s.serve.port == 8000
    assert with_overrides(Settings(), {}) == Settings()


def test_overrides_win_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SD_SERVE__PORT", "8081")
    s = with_overrides(Settings(), {"serve.port": 9002})
    assert s.serve.port == 9002


def test_overrides_preserve_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SD_SERVE__FEEDBACK_TOKENS", '{"alice": "s3cret-a"}')
    monkeypatch.setenv("SD_SERVE__ADMIN_TOKEN", "adm1n-tok")
    base = Settings(kafka=KafkaSettings(sasl_password=SecretStr("kafka-pw")))
    s = with_overrides(base, {"serve.port": 9003, "kafka.bootstrap_servers": "h:1"})
    assert s.serve.feedback_tokens["alice"].get_secret_value() == "s3cret-a"
    assert isinstance(s.serve.feedback_tokens["alice"], SecretStr)
    assert s.serve.admin_token is not None
    assert s.serve.admin_token.get_secret_value() == "adm1n-tok"
    assert s.kafka.sasl_password is not None
    assert s.kafka.sasl_password.get_secret_value() == "kafka-pw"
    assert "s3cret-a" not in repr(s) and "adm1n-tok" not in repr(s)


def test_override_can_set_a_secret() -> None:
    s = with_overrides(Settings(), {"serve.admin_token": "new-tok"})
    assert isinstance(s.serve.admin_token, SecretStr)
    assert s.serve.admin_token.get_secret_value() == "new-tok"


@pytest.mark.parametrize(
    "overrides", [{"serve.port": "not-a-port"}, {"serve.prot": 1}, {"trainer.lr": -1.0}]
)
def test_bad_overrides_are_rejected(overrides: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        with_overrides(Settings(), overrides)
