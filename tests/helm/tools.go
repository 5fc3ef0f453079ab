//go:build tools

// Package tools keeps the helm command in go.mod and go.sum, so that `go mod tidy`
// does not drop it and scripts/build-helm.sh can build it with -mod=readonly.
package tools

import (
	_ "helm.sh/helm/v4/cmd/helm"
)
