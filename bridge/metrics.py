"""`embedq_bridge_*` Prometheus metrics, served on --metrics-port."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class BridgeMetrics:
    """One bridge's metrics, in a registry of their own (several bridges in one
    process, as in tests, do not collide)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.consumed = Counter(
            "embedq_bridge_consumed", "Messages taken from the source", registry=r
        )
        self.published = Counter(
            "embedq_bridge_published", "Results published to the sink (confirmed)", registry=r
        )
        self.acked = Counter(
            "embedq_bridge_acknowledged", "Source messages acknowledged", registry=r
        )
        self.dead_lettered = Counter(
            "embedq_bridge_dead_lettered",
            "Poison messages published to --dead-letter",
            ["reason"],
            registry=r,
        )
        self.rejected = Counter(
            "embedq_bridge_rejected",
            "Poison messages rejected the broker's way (no --dead-letter)",
            ["reason"],
            registry=r,
        )
        self.retried = Counter(
            "embedq_bridge_retried",
            "Retries: server trouble (by gRPC code) or a failed broker call",
            ["cause"],
            registry=r,
        )
        self.reconnects = Counter(
            "embedq_bridge_reconnects",
            "Broker connections opened again after they dropped (AMQP, MQTT)",
            ["broker"],
            registry=r,
        )
        self.source_dropped = Counter(
            "embedq_bridge_source_dropped",
            "Messages the source dropped as its broker allows (MQTT QoS 0 past qos0_buffer)",
            registry=r,
        )
        self.in_flight = Gauge(
            "embedq_bridge_in_flight", "Messages held (taken, not yet acknowledged)", registry=r
        )
        self.lag = Gauge(
            "embedq_bridge_lag",
            "Messages waiting on the source broker for this consumer (-1: not reported)",
            registry=r,
        )
        self.lag.set(-1)
        self.server_up = Gauge(
            "embedq_bridge_server_up", "1 while the EncodeStream call is healthy", registry=r
        )

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        start_http_server(port, addr=host, registry=self.registry)


def reason_label(reason: str) -> str:
    """A low-cardinality label for a poison reason (its first words)."""
    for prefix in (
        "body is not UTF-8",
        "body is not JSON",
        "body is a JSON",
        "no field",
        "field",
        "text is",
        "INVALID_ARGUMENT",
    ):
        if reason.startswith(prefix):
            return prefix
    return reason.split(":", 1)[0][:40]
