// Command etcd runs the etcd server from the go.etcd.io/etcd/server/v3 version that
// k8s.io/kubernetes requires, so the test control plane uses the etcd it was built against.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
