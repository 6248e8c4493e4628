package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
)

// selftest is what the chart's `helm test` pods run in the driver's own
// image (so an air-gapped cluster needs no other image):
//
//	csi-dmthin selftest write DIR    write a file of known content, synced
//	csi-dmthin selftest verify DIR   read it back and compare
//
// The test writes on a new volume, snapshots it, restores the snapshot to
// another volume and verifies there.

// selftestFile is the file's name in DIR.
const selftestFile = "csi-dmthin-selftest.bin"

// selftestBytes is the file's size: a few blocks of the pool, not one.
const selftestBytes = 1 << 20

// selftestData is the file's content: a hash chain, so that a block out of
// place or zeros read back fail.
func selftestData() []byte {
	b := make([]byte, 0, selftestBytes)
	sum := sha256.Sum256([]byte("csi-dmthin selftest"))
	for len(b) < selftestBytes {
		b = append(b, sum[:]...)
		sum = sha256.Sum256(sum[:])
	}
	return b[:selftestBytes]
}

func selftest(args []string) error {
	if len(args) != 2 || (args[0] != "write" && args[0] != "verify") {
		return usageError{fmt.Errorf("usage: csi-dmthin selftest write|verify DIR")}
	}
	path := filepath.Join(args[1], selftestFile)
	want := selftestData()
	sum := sha256.Sum256(want)
	if args[0] == "write" {
		f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
		if err != nil {
			return err
		}
		if _, err := f.Write(want); err != nil {
			f.Close()
			return err
		}
		if err := f.Sync(); err != nil {
			f.Close()
			return err
		}
		if err := f.Close(); err != nil {
			return err
		}
		fmt.Printf("wrote %s: %d bytes, sha256 %s\n", path, len(want), hex.EncodeToString(sum[:]))
		return nil
	}
	got, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if !bytes.Equal(got, want) {
		gs := sha256.Sum256(got)
		return fmt.Errorf("%s: %d bytes with sha256 %s, want %d bytes with sha256 %s", path, len(got), hex.EncodeToString(gs[:]), len(want), hex.EncodeToString(sum[:]))
	}
	fmt.Printf("verified %s: %d bytes, sha256 %s\n", path, len(got), hex.EncodeToString(sum[:]))
	return nil
}
