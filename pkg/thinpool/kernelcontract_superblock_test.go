package thinpool

import (
	"errors"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
)

// The kernel contract's pool metadata superblock (see
// kernelcontract_test.go, and superblock_kernel_test.go for the byte-wise
// comparison of the fake's with the kernel's).

// kcSuperblockTID is a transaction id with a different byte in each place,
// so that a field read a few bytes off cannot match it.
const kcSuperblockTID = 0x0102030405060708

// kcSuperblockState makes a pool with a thin device, three data blocks
// written and a transaction id set: the state whose superblock the tests
// below read.
func kcSuperblockState(t *testing.T, e env) *kcPool {
	t.Helper()
	p := newKCPool(t, e, 64<<20, 0, devmapper.ThinPoolFeatures{})
	p.message(t, devmapper.CreateThin{DeviceID: 1})
	thin := p.activate(t, 1, 8<<20/devmapper.SectorSize)
	kcWrite(t, e, thin.Dev, 0, pattern(3, 3*kcBlockBytes))
	p.message(t, devmapper.SetTransactionID{Current: 0, New: kcSuperblockTID})
	return p
}

// kcSuperblock reads the superblock of a running pool and checks each
// field the parser names against what the kernel reports another way
// (the status line, the table). On the real kernel this checks the
// parser's offsets against the kernel's own bytes; on the fake, the
// fake's writer through the same parser.
func kcSuperblock(t *testing.T, e env) {
	p := kcSuperblockState(t, e)
	p.message(t, devmapper.ReserveMetadataSnap{}) // a held root that is not 0
	st := p.status(t)
	_, sb := p.superblock(t)
	t.Logf("superblock %+v; status %+v", sb, st)
	for _, f := range []struct {
		name      string
		got, want uint64
	}{
		{"transaction id", sb.TransactionID, kcSuperblockTID},
		{"transaction id (status)", sb.TransactionID, st.TransactionID},
		{"held root (status)", sb.HeldRoot, st.HeldMetadataRoot},
		{"data blocks (status)", sb.DataSpaceMap.NrBlocks, st.TotalDataBlocks},
		{"data blocks allocated (status)", sb.DataSpaceMap.NrAllocated, st.UsedDataBlocks},
		{"data blocks allocated", sb.DataSpaceMap.NrAllocated, 3},
		{"metadata space map blocks (status)", sb.MetadataSpaceMap.NrBlocks, st.TotalMetadataBlocks},
		{"metadata blocks (status)", sb.MetadataNrBlocks, st.TotalMetadataBlocks},
		{"metadata blocks", sb.MetadataNrBlocks, kcMetaBytes / 4096},
		{"data block sectors (table)", uint64(sb.DataBlockSectors), uint64(p.params.BlockSectors)},
		{"metadata block sectors", uint64(sb.MetadataBlockSectors), devmapper.MetadataBlockSectors},
	} {
		if f.got != f.want {
			t.Errorf("superblock %s: %d, want %d", f.name, f.got, f.want)
		}
	}
	if sb.HeldRoot == 0 || sb.NeedsCheck != st.NeedsCheck || sb.NeedsCheck {
		t.Errorf("superblock held root %d, needs_check %v; status %+v", sb.HeldRoot, sb.NeedsCheck, st)
	}
	p.message(t, devmapper.ReleaseMetadataSnap{})
	if _, sb := p.superblock(t); sb.HeldRoot != 0 {
		t.Errorf("held root %d after release_metadata_snap", sb.HeldRoot)
	}
}

// kcSuperblockRewritten changes a stopped pool's superblock with
// Superblock.Put (the fake's writer) and loads the pool again: the
// kernel's loader must take the new transaction id and needs_check flag,
// and accept the checksum, so the writer's offsets and checksum are the
// kernel's too.
func kcSuperblockRewritten(t *testing.T, e env) {
	p := newKCPool(t, e, 64<<20, 0, devmapper.ThinPoolFeatures{})
	p.message(t, devmapper.SetTransactionID{Current: 0, New: 5})
	if err := p.k.Remove(p.info.Dev, false); err != nil {
		t.Fatal(err)
	}
	buf, sb := p.superblock(t)
	if sb.TransactionID != 5 || sb.NeedsCheck {
		t.Fatalf("superblock of the stopped pool %+v", sb)
	}
	sb.TransactionID, sb.NeedsCheck = kcSuperblockTID, true
	sb.Put(buf)
	if err := p.k.WriteBlock(p.params.MetadataDev, 0, buf); err != nil {
		t.Fatal(err)
	}
	p.info = kcCreate(t, p.k, "pool-again")
	p.load(t)
	// needs_check keeps the pool read-only: it refuses messages with
	// EOPNOTSUPP, as dm-thin's pool_message does in that mode.
	if st := p.status(t); st.TransactionID != kcSuperblockTID || !st.NeedsCheck || st.Mode != devmapper.PoolReadOnly {
		t.Errorf("pool loaded on the rewritten superblock: %+v", st)
	}
	if err := p.k.Message(p.info.Dev, devmapper.CreateThin{DeviceID: 1}); !errors.Is(err, unix.EOPNOTSUPP) {
		t.Errorf("message to a needs_check pool: %v, want EOPNOTSUPP", err)
	}
}
