"""dataplane: a Kubernetes Service data plane that replaces kube-proxy."""
