"""Talking to a nested cluster: manifests, port-forwards, readiness, kubeconfigs, TLS, reports."""
