//go:build tools

// Package tools keeps the Kubernetes control-plane commands in go.mod and go.sum,
// so that `go mod tidy` does not drop them and scripts/build-k8s.sh can build
// them with -mod=readonly.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
