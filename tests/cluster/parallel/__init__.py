"""Expert parallelism on Ray: the exchange, workers, failover, rebalancing, messages."""
