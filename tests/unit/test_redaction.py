"""No secret is written down: what config.yaml, checkpoints and model.pt receive from a config."""

from __future__ import annotations

import pytest
import yaml

from imgtrain.config import (
    REDACTED,
    ConfigError,
    dump_config,
    literal_credentials,
    load_config,
    redact_url,
    resolve_storage_options,
)
from imgtrain.train.evaluate import eval_base

SECRETS = ["AKIAEXAMPLE", "s3cr3t-value", "hunter2", "xoxb-slack-token", "sess-tok"]

OVERRIDES = [
    "checkpoint.storage_options={key: AKIAEXAMPLE, secret: s3cr3t-value, "
    "client_kwargs: {endpoint_url: 'https://minio:hunter2@minio.local:9000', region_name: eu-west-1}}",
    "data.storage_options={anon: false, token: '${GCS_TOKEN}', client_kwargs: {aws_session_token: sess-tok}}",
    "monitoring.notify.urls=['mailtos://bob:hunter2@smtp.example.com?to=ops@example.com', "
    "'slack://xoxb-slack-token/B0/C0', 'json://hooks.local/x?token=${HOOK_TOKEN}', '${WEBHOOK}']",
]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://user:pass@host:9000/path", f"https://{REDACTED}@host:9000/path"),
        ("https://TOKEN@github.com/o/r", f"https://{REDACTED}@github.com/o/r"),
        ("https://${USER}:${PASS}@host/p", "https://${USER}:${PASS}@host/p"),
        ("https://host/p?api_key=abc&region=eu", f"https://host/p?api_key={REDACTED}&region=eu"),
        ("https://host/p?token=${T}", "https://host/p?token=${T}"),
        ("s3://bucket/prefix", "s3://bucket/prefix"),
        ("/data/imagenet", "/data/imagenet"),
    ],
)
def test_redact_url(url, expected):
    assert redact_url(url) == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("slack://xoxb-literal/B0/C0", f"slack://{REDACTED}"),
        # partly templated: the literal token in the path still goes
        ("tgram://${BOT}/123456789:AAHliteraltoken/", f"tgram://${{BOT}}/{REDACTED}/"),
        ("slack://${A}/${B}/${C}", "slack://${A}/${B}/${C}"),
        (
            "mailtos://${U}:${P}@smtp.example.com?to=ops@example.com",
            "mailtos://${U}:${P}@smtp.example.com?to=ops@example.com",
        ),
    ],
)
def test_notification_urls_keep_no_literal_token(url, expected):
    assert redact_url(url, whole=True) == expected


def test_storage_options_read_var_references_from_the_environment(monkeypatch):
    options = {"key": "${AWS_KEY}", "anon": False, "client_kwargs": {"endpoint_url": "https://${HOST}:9000"}}
    monkeypatch.setenv("AWS_KEY", "AKIAFROMENV")
    monkeypatch.setenv("HOST", "minio.local")
    resolved = resolve_storage_options(options, "checkpoint.storage_options")
    assert resolved == {
        "key": "AKIAFROMENV",
        "anon": False,
        "client_kwargs": {"endpoint_url": "https://minio.local:9000"},
    }
    assert options["key"] == "${AWS_KEY}"  # the config keeps the reference: that is what is written down
    monkeypatch.delenv("HOST")
    with pytest.raises(ConfigError, match=r"checkpoint\.storage_options\.client_kwargs\.endpoint_url.*HOST"):
        resolve_storage_options(options, "checkpoint.storage_options")


def test_persisted_config_holds_no_secret_and_the_live_one_keeps_them(tmp_path):
    cfg = load_config("quickstart", OVERRIDES)
    path = tmp_path / "config.yaml"
    dump_config(cfg, path)
    text = path.read_text()
    for secret in SECRETS:
        assert secret not in text
    saved = yaml.safe_load(text)
    so = saved["checkpoint"]["storage_options"]
    assert so["key"] == so["secret"] == REDACTED
    assert so["client_kwargs"] == {
        "endpoint_url": f"https://{REDACTED}@minio.local:9000",
        "region_name": "eu-west-1",
    }
    assert saved["data"]["storage_options"] == {
        "anon": False,
        "token": "${GCS_TOKEN}",
        "client_kwargs": {"aws_session_token": REDACTED},
    }
    assert saved["monitoring"]["notify"]["urls"] == [
        f"mailtos://{REDACTED}",
        f"slack://{REDACTED}",
        "json://hooks.local/x?token=${HOOK_TOKEN}",
        "${WEBHOOK}",
    ]
    # Whatever else the config says survives, and the redacted file still loads.
    again = load_config(path)
    assert again.model == cfg.model and again.training == cfg.training
    # The running process keeps the real values.
    assert cfg.checkpoint.storage_options["secret"] == "s3cr3t-value"
    assert cfg.monitoring.notify.urls[0].startswith("mailtos://bob:hunter2@")
    assert cfg.to_dict(redact=False)["checkpoint"]["storage_options"]["key"] == "AKIAEXAMPLE"


def test_literal_credentials_are_named_for_the_start_warning():
    found = literal_credentials(load_config("quickstart", OVERRIDES))
    assert found == [
        "data.storage_options.client_kwargs.aws_session_token",
        "checkpoint.storage_options.key",
        "checkpoint.storage_options.secret",
        "checkpoint.storage_options.client_kwargs.endpoint_url",
        "monitoring.notify.urls[0]",
        "monitoring.notify.urls[1]",
    ]
    assert literal_credentials(load_config("quickstart")) == []


def test_eval_takes_only_model_and_transform_fields_from_a_checkpoint():
    saved = load_config(
        "quickstart",
        [
            *OVERRIDES,
            "data.root=/their/data",
            "data.image_size=24",
            "data.val_resize=28",
            "model.width=16",
            "data.format=shards",
            "data.cache.dir=/their/cache",
            "output_dir=/their/run",
        ],
    ).to_dict(redact=False)
    base = eval_base(saved)
    assert base["model"] == saved["model"]
    transform = ("image_size", "val_resize", "val_crop_fraction", "mean", "std")
    assert base["data"] == {k: saved["data"][k] for k in transform} | {
        "decode": {"decoder": saved["data"]["decode"]["decoder"]}
    }
    assert set(base) == {"model", "data"}
    cfg = load_config(None, ["data.root=/mine"], base=base)
    assert (
        cfg.data.root == "/mine" and cfg.data.storage_options == {} and cfg.checkpoint.storage_options == {}
    )
    assert cfg.data.format == "folder" and cfg.data.cache.dir is None and cfg.monitoring.notify.urls == []
    assert cfg.data.image_size == 24 and cfg.model.width == 16
