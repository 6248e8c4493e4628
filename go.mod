module github.com/csi-dmthin/csi-dmthin

go 1.26.0

require golang.org/x/sys v0.50.0

require go.etcd.io/bbolt v1.5.0
