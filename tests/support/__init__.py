"""Test support, one module per role: constants, pki, configs, logcapture, inprocess, processes, calls, files,
clients, bff, topology (replicas behind HAProxy), redisserver."""
