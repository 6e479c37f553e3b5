"""gateway: the store-and-forward uplink, its frames and store, and cloud-side ingest."""

from gateway.errors import FrameError, GatewayError, SettingsError, SinkError, StoreCorrupt, StoreError
from gateway.frames import Frame, decode, encode
from gateway.settings import GatewaySettings, IngestSettings, gateway_settings, ingest_settings
from gateway.store import LaneSpec, Store

__all__ = [
    "Frame",
    "FrameError",
    "GatewayError",
    "GatewaySettings",
    "IngestSettings",
    "LaneSpec",
    "SettingsError",
    "SinkError",
    "Store",
    "StoreCorrupt",
    "StoreError",
    "decode",
    "encode",
    "gateway_settings",
    "ingest_settings",
]
