"""The control-plane models shared by the operator and local mode: the SplitInference spec, the
scaling policy and the reading of the router's metrics. Pure: no Kubernetes, no processes."""
