"""The SPIFFE Workload API's workload.proto and its generated stubs, for the stand-in agent (support.agentprocess) only."""
