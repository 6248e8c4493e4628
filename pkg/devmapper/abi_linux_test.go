//go:build !vmtest

package devmapper

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// TestABILayout compiles a C program against the installed kernel header
// (linux/dm-ioctl.h, from linux-libc-dev) and compares every size and offset
// this package relies on with the Go side.
func TestABILayout(t *testing.T) {
	const header = "/usr/include/linux/dm-ioctl.h"
	cc, err := exec.LookPath("gcc")
	if _, statErr := os.Stat(header); err != nil || statErr != nil {
		msg := "needs gcc and " + header + " (apt-get install gcc linux-libc-dev, or make deps)"
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	const prog = `#include <stdio.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <linux/dm-ioctl.h>
#define P(name, v) printf("%s %zu\n", name, (size_t)(v))
int main(void) {
	P("sizeof.dm_ioctl", sizeof(struct dm_ioctl));
	P("dm_ioctl.version", offsetof(struct dm_ioctl, version));
	P("dm_ioctl.data_size", offsetof(struct dm_ioctl, data_size));
	P("dm_ioctl.data_start", offsetof(struct dm_ioctl, data_start));
	P("dm_ioctl.target_count", offsetof(struct dm_ioctl, target_count));
	P("dm_ioctl.open_count", offsetof(struct dm_ioctl, open_count));
	P("dm_ioctl.flags", offsetof(struct dm_ioctl, flags));
	P("dm_ioctl.event_nr", offsetof(struct dm_ioctl, event_nr));
	P("dm_ioctl.dev", offsetof(struct dm_ioctl, dev));
	P("dm_ioctl.name", offsetof(struct dm_ioctl, name));
	P("dm_ioctl.uuid", offsetof(struct dm_ioctl, uuid));
	P("dm_ioctl.data", offsetof(struct dm_ioctl, data));
	P("sizeof.dm_target_spec", sizeof(struct dm_target_spec));
	P("dm_target_spec.sector_start", offsetof(struct dm_target_spec, sector_start));
	P("dm_target_spec.length", offsetof(struct dm_target_spec, length));
	P("dm_target_spec.status", offsetof(struct dm_target_spec, status));
	P("dm_target_spec.next", offsetof(struct dm_target_spec, next));
	P("dm_target_spec.target_type", offsetof(struct dm_target_spec, target_type));
	P("dm_name_list.dev", offsetof(struct dm_name_list, dev));
	P("dm_name_list.next", offsetof(struct dm_name_list, next));
	P("dm_name_list.name", offsetof(struct dm_name_list, name));
	P("dm_target_versions.next", offsetof(struct dm_target_versions, next));
	P("dm_target_versions.version", offsetof(struct dm_target_versions, version));
	P("dm_target_versions.name", offsetof(struct dm_target_versions, name));
	P("dm_target_msg.message", offsetof(struct dm_target_msg, message));
	P("DM_NAME_LEN", DM_NAME_LEN);
	P("DM_UUID_LEN", DM_UUID_LEN);
	P("DM_MAX_TYPE_NAME", DM_MAX_TYPE_NAME);
	P("DM_TABLE_LOAD", DM_TABLE_LOAD);
	P("DM_TARGET_MSG", DM_TARGET_MSG);
	P("DM_DEV_ARM_POLL", DM_DEV_ARM_POLL);
	P("DM_NAME_LIST_FLAG_HAS_UUID", DM_NAME_LIST_FLAG_HAS_UUID);
	P("DM_DEFERRED_REMOVE", DM_DEFERRED_REMOVE);
	return 0;
}
`
	dir := t.TempDir()
	src := filepath.Join(dir, "abi.c")
	if err := os.WriteFile(src, []byte(prog), 0o644); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "abi")
	if out, err := exec.Command(cc, "-o", bin, src).CombinedOutput(); err != nil {
		t.Fatalf("compile: %v\n%s", err, out)
	}
	out, err := exec.Command(bin).Output()
	if err != nil {
		t.Fatal(err)
	}
	c := map[string]uint64{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		k, v, _ := strings.Cut(line, " ")
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatalf("bad line %q", line)
		}
		c[k] = n
	}
	var h unix.DmIoctl
	var s unix.DmTargetSpec
	goSide := map[string]uint64{
		"sizeof.dm_ioctl":             headerSize,
		"dm_ioctl.version":            uint64(unsafe.Offsetof(h.Version)),
		"dm_ioctl.data_size":          uint64(unsafe.Offsetof(h.Data_size)),
		"dm_ioctl.data_start":         uint64(unsafe.Offsetof(h.Data_start)),
		"dm_ioctl.target_count":       uint64(unsafe.Offsetof(h.Target_count)),
		"dm_ioctl.open_count":         uint64(unsafe.Offsetof(h.Open_count)),
		"dm_ioctl.flags":              uint64(unsafe.Offsetof(h.Flags)),
		"dm_ioctl.event_nr":           uint64(unsafe.Offsetof(h.Event_nr)),
		"dm_ioctl.dev":                uint64(unsafe.Offsetof(h.Dev)),
		"dm_ioctl.name":               uint64(unsafe.Offsetof(h.Name)),
		"dm_ioctl.uuid":               uint64(unsafe.Offsetof(h.Uuid)),
		"dm_ioctl.data":               uint64(unsafe.Offsetof(h.Data)),
		"sizeof.dm_target_spec":       targetSpecSize,
		"dm_target_spec.sector_start": uint64(unsafe.Offsetof(s.Sector_start)),
		"dm_target_spec.length":       uint64(unsafe.Offsetof(s.Length)),
		"dm_target_spec.status":       uint64(unsafe.Offsetof(s.Status)),
		"dm_target_spec.next":         uint64(unsafe.Offsetof(s.Next)),
		"dm_target_spec.target_type":  uint64(unsafe.Offsetof(s.Target_type)),
		"dm_name_list.dev":            0,
		"dm_name_list.next":           8,
		"dm_name_list.name":           nameListHeaderSize,
		"dm_target_versions.next":     0,
		"dm_target_versions.version":  4,
		"dm_target_versions.name":     targetVersionsHeaderSize,
		"dm_target_msg.message":       targetMsgHeaderSize,
		"DM_NAME_LEN":                 maxNameLen + 1,
		"DM_UUID_LEN":                 maxUUIDLen + 1,
		"DM_MAX_TYPE_NAME":            maxTypeLen + 1,
		"DM_TABLE_LOAD":               unix.DM_TABLE_LOAD,
		"DM_TARGET_MSG":               unix.DM_TARGET_MSG,
		"DM_DEV_ARM_POLL":             unix.DM_DEV_ARM_POLL,
		"DM_NAME_LIST_FLAG_HAS_UUID":  unix.DM_NAME_LIST_FLAG_HAS_UUID,
		"DM_DEFERRED_REMOVE":          unix.DM_DEFERRED_REMOVE,
	}
	if len(c) != len(goSide) {
		t.Fatalf("C printed %d values, Go side has %d", len(c), len(goSide))
	}
	for k, want := range c {
		got, ok := goSide[k]
		if !ok {
			t.Errorf("%s: no Go counterpart", k)
		} else if got != want {
			t.Errorf("%s: Go %d, kernel header %d", k, got, want)
		}
	}
}
