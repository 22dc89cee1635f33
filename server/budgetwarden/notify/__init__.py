"""Notifications: events the scripts wrote to each tenant's notification stream (store/_notify.py), delivered by the
control plane to webhooks as signed CloudEvents and to Slack-compatible webhooks as text, with retries and backoff.
Nothing here runs on the check path: a sidecar only writes the event, in the script that makes it happen."""

from ._deliverer import Backoff, Deliverer, Target, targets_of
from ._events import SIGNATURE_HEADERS, cloud_event, read_secret, sign, slack_text, verify

__all__ = [
    "SIGNATURE_HEADERS",
    "Backoff",
    "Deliverer",
    "Target",
    "cloud_event",
    "read_secret",
    "sign",
    "slack_text",
    "targets_of",
    "verify",
]
