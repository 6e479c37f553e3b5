"""Built-in services, each runnable with ``edgeferry service run``:

- ``edge.services.aggregator:service`` — windowed count/min/max/mean/last per device
  and stream, published to ``evt/aggregate/<device>``;
- ``edge.services.rules:service`` — threshold and rate-of-change rules from YAML, with
  hysteresis and a minimum interval, published to ``evt/alert/<device>``.

docs/services.md documents both; deploy/services/ has example configs.
"""

__all__: list[str] = []
