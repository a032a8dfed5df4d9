"""Run events (started, finished, failed, resumed, diverged) from rank 0 to Slack, email, webhooks, ...
through apprise URLs, for users without Alertmanager. A notification that cannot be delivered is logged
as a warning: it never stops training."""

from __future__ import annotations

import logging
import os
import re
import socket
from typing import Any

from imgtrain.config import NotifyConfig

log = logging.getLogger(__name__)

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_TYPES = {
    "started": "info",
    "resumed": "warning",
    "finished": "success",
    "failed": "failure",
    "diverged": "failure",
}


def expand_env(text: str, key: str) -> str | None:
    """``${VAR}`` from the environment; None (with a warning naming the key and variable) if one is unset."""
    missing = [m for m in _VAR.findall(text) if m not in os.environ]
    if missing:
        log.warning(
            "%s: environment variable(s) %s not set; that notification target is skipped",
            key,
            ", ".join(missing),
        )
        return None
    return _VAR.sub(lambda m: os.environ[m.group(1)], text)


class Notifier:
    """Built on every rank, sends only where ``enabled`` (rank 0)."""

    def __init__(self, cfg: NotifyConfig, run_id: str, enabled: bool, key: str = "monitoring.notify"):
        self.cfg, self.run_id = cfg, run_id
        self.apprise = None
        if not enabled or not (cfg.urls or cfg.urls_file):
            return
        import apprise

        self.apprise = apprise.Apprise()
        for i, url in enumerate(cfg.urls):
            expanded = expand_env(url, f"{key}.urls[{i}]")
            # Never log the URL itself: it holds the webhook token or the SMTP password.
            if expanded is not None and not self.apprise.add(expanded):
                log.warning("%s.urls[%d]: apprise does not recognise this URL; skipped", key, i)
        if cfg.urls_file:
            conf = apprise.AppriseConfig()
            if not os.path.isfile(cfg.urls_file) or not conf.add(cfg.urls_file):
                log.warning("%s.urls_file: cannot read %s; skipped", key, cfg.urls_file)
            else:
                self.apprise.add(conf)
        if not len(self.apprise):
            log.warning("%s: no usable notification target; run events are not sent", key)
            self.apprise = None

    @property
    def active(self) -> bool:
        return self.apprise is not None

    def notify(self, event: str, summary: str, details: dict[str, Any] | None = None) -> bool:
        """Sends one event if it is configured; True if every target accepted it."""
        if self.apprise is None or event not in self.cfg.events:
            return False
        import apprise

        title = f"imgtrain run {self.run_id} {event}"
        lines = [summary, f"host: {socket.gethostname()}"]
        lines += [f"{k}: {v}" for k, v in (details or {}).items() if v is not None]
        try:
            ok = bool(
                self.apprise.notify(
                    title=title,
                    body="\n".join(lines),
                    notify_type=getattr(apprise.NotifyType, _TYPES[event].upper()),
                )
            )
        except Exception as e:  # a notification must never take the training down with it
            log.warning("notification '%s' failed: %s: %s", event, type(e).__name__, e)
            return False
        if not ok:
            log.warning(
                "notification '%s' was not delivered to every target (see apprise's messages above)", event
            )
        return ok
