"""KV identity and movement: the block-hash function, KV connectors/transports, the store."""
