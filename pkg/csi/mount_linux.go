package csi

import (
	"fmt"
	"strings"

	"golang.org/x/sys/unix"
)

// Mounting with mount(2) rather than by running mount(8): an exec costs
// 30-50 ms under TCG and several on a busy node, and staging a volume
// cloned from a template has nothing else left to wait for.

// mountFlag is an option that mount(8) turns into a mount(2) flag.
type mountFlag struct{ set, clear uintptr }

var mountFlags = map[string]mountFlag{
	"defaults":    {},
	"ro":          {set: unix.MS_RDONLY},
	"rw":          {clear: unix.MS_RDONLY},
	"nosuid":      {set: unix.MS_NOSUID},
	"suid":        {clear: unix.MS_NOSUID},
	"nodev":       {set: unix.MS_NODEV},
	"dev":         {clear: unix.MS_NODEV},
	"noexec":      {set: unix.MS_NOEXEC},
	"exec":        {clear: unix.MS_NOEXEC},
	"sync":        {set: unix.MS_SYNCHRONOUS},
	"async":       {clear: unix.MS_SYNCHRONOUS},
	"dirsync":     {set: unix.MS_DIRSYNC},
	"noatime":     {set: unix.MS_NOATIME},
	"atime":       {clear: unix.MS_NOATIME},
	"nodiratime":  {set: unix.MS_NODIRATIME},
	"diratime":    {clear: unix.MS_NODIRATIME},
	"relatime":    {set: unix.MS_RELATIME},
	"norelatime":  {clear: unix.MS_RELATIME},
	"strictatime": {set: unix.MS_STRICTATIME},
	"lazytime":    {set: unix.MS_LAZYTIME},
	"nolazytime":  {clear: unix.MS_LAZYTIME},
	"mand":        {set: unix.MS_MANDLOCK},
	"nomand":      {clear: unix.MS_MANDLOCK},
	"silent":      {set: unix.MS_SILENT},
	"loud":        {clear: unix.MS_SILENT},
	"bind":        {set: unix.MS_BIND},
	"rbind":       {set: unix.MS_BIND | unix.MS_REC},
}

// userOnly reports options that only mount(8) and fstab read; mount(8)
// drops them before calling the kernel, and so do we.
func userOnly(o string) bool {
	switch o {
	case "_netdev", "nofail", "auto", "noauto", "user", "nouser", "users", "owner", "group":
		return true
	}
	return strings.HasPrefix(o, "x-") || strings.HasPrefix(o, "comment=")
}

// mountArgs turns mount(8) options into mount(2)'s flags and data: the
// options the kernel's VFS knows become flags, the rest (the filesystem's
// own, and LSM ones such as context=) go to the filesystem as data.
func mountArgs(options []string) (flags uintptr, data string) {
	var rest []string
	for _, o := range options {
		if f, ok := mountFlags[o]; ok {
			flags = flags&^f.clear | f.set
			continue
		}
		if o == "" || userOnly(o) {
			continue
		}
		rest = append(rest, o)
	}
	return flags, strings.Join(rest, ",")
}

// sysMount mounts like mount(8) -t fstype -o options source target. A bind
// mount takes a second call for per-mount flags such as ro, which the
// kernel ignores on the bind itself.
func sysMount(source, target, fstype string, options []string) error {
	flags, data := mountArgs(options)
	if flags&unix.MS_BIND == 0 {
		if err := unix.Mount(source, target, fstype, flags, data); err != nil {
			return fmt.Errorf("mount -t %s -o %s %s %s: %w", fstype, strings.Join(options, ","), source, target, err)
		}
		return nil
	}
	if err := unix.Mount(source, target, "", flags&(unix.MS_BIND|unix.MS_REC), ""); err != nil {
		return fmt.Errorf("mount --bind %s %s: %w", source, target, err)
	}
	if rest := flags &^ (unix.MS_BIND | unix.MS_REC); rest != 0 {
		// A bind remount sets the mount's flags to exactly these: keep the
		// ones the bind inherited from its source (a volume staged noatime
		// or nosuid stays so when published read-only).
		var st unix.Statfs_t
		if err := unix.Statfs(target, &st); err != nil {
			_ = unix.Unmount(target, unix.MNT_DETACH)
			return fmt.Errorf("statfs %s: %w", target, err)
		}
		rest |= inheritedFlags(st.Flags)
		if err := unix.Mount("", target, "", unix.MS_REMOUNT|unix.MS_BIND|rest, ""); err != nil {
			_ = unix.Unmount(target, unix.MNT_DETACH)
			return fmt.Errorf("mount -o remount,bind,%s %s: %w", strings.Join(options, ","), target, err)
		}
	}
	return nil
}

// inheritedFlags maps statfs(2)'s per-mount ST_ flags to mount(2)'s MS_
// flags.
func inheritedFlags(st int64) uintptr {
	var out uintptr
	for _, m := range []struct {
		st int64
		ms uintptr
	}{
		{unix.ST_RDONLY, unix.MS_RDONLY},
		{unix.ST_NOSUID, unix.MS_NOSUID},
		{unix.ST_NODEV, unix.MS_NODEV},
		{unix.ST_NOEXEC, unix.MS_NOEXEC},
		{unix.ST_NOATIME, unix.MS_NOATIME},
		{unix.ST_NODIRATIME, unix.MS_NODIRATIME},
		{unix.ST_RELATIME, unix.MS_RELATIME},
	} {
		if st&m.st != 0 {
			out |= m.ms
		}
	}
	return out
}
