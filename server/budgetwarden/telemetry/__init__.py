"""OpenTelemetry metrics for operators and billing. Low in the stack: the store and the limiter record into it."""

from ._metrics import ReportedUsage, Telemetry, telemetry_from_env

__all__ = [
    "ReportedUsage",
    "Telemetry",
    "telemetry_from_env",
]
