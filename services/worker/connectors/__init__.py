"""The worker side of KV connectors: one file per connector (services/engine/kv_connector.py)."""
