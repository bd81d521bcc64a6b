"""Test support, one module per role: constants, pki, configs, logcapture, inprocess, processes, calls, files,
clients, bff, topology (replicas behind HAProxy), redisserver, workloadagent (a stand-in SPIFFE Workload API
agent, run as agentprocess, speaking workloadapi/workload.proto)."""
