// Package safepath resolves paths beneath a root directory (the kubelet's)
// without following symbolic links and without leaving the root, and does
// the node service's directory work there: look a path up, make it and its
// parents, create a file, remove it. Every step is relative to a file
// descriptor opened beneath the root (openat2(2) with RESOLVE_BENEATH and
// RESOLVE_NO_SYMLINKS, mkdirat, unlinkat), never a check on a path string
// followed by a use of the same string, which a symbolic link swapped in
// between the two would redirect.
//
// The root itself is configuration and is opened as given. A path is
// refused when it is not absolute, not strictly beneath the root once
// cleaned (ErrNotBeneath), or when resolving it meets a symbolic link or
// would step out of the root (ErrSymlink). It knows nothing of mounts,
// volumes or CSI; callers mount onto and unmount through what it opens.
//
// It needs Linux 5.6 or later (openat2).
package safepath
