package vmtest

import (
	"context"
	"fmt"
	"reflect"
	"strings"
	"testing"
)

// fakeModules is a modSource over an in-memory module set. Like a real
// tree it knows files by normalized name and fails on unknown paths.
type fakeModules struct {
	infos    map[string]modInfo // normalized name -> info
	builtins map[string]bool
}

func (f *fakeModules) lookup(name string) (string, bool) {
	if _, ok := f.infos[name]; ok {
		return "/lib/modules/kernel/" + name + ".ko", true
	}
	return "", false
}

func (f *fakeModules) builtin(name string) bool { return f.builtins[name] }

func (f *fakeModules) info(_ context.Context, path string) (modInfo, error) {
	name := normalizeModName(path)
	mi, ok := f.infos[name]
	if !ok {
		return modInfo{}, fmt.Errorf("no module file %s", path)
	}
	return mi, nil
}

// debian12 mirrors the .modinfo of Debian 12's modules for the defaults.
func debian12() *fakeModules {
	return &fakeModules{infos: map[string]modInfo{
		"loop":               {},
		"dm_mod":             {},
		"dm_bufio":           {},
		"dm_bio_prison":      {},
		"dm_persistent_data": {depends: []string{"dm-bufio", "libcrc32c"}},
		"dm_thin_pool":       {depends: []string{"dm-bio-prison", "dm-persistent-data", "dm-mod"}},
		"crc32c_generic":     {},
		"crc32c_intel":       {},
		"libcrc32c":          {softPre: []string{"crc32c"}},
		"crc16":              {},
		"mbcache":            {},
		"jbd2":               {softPre: []string{"crypto-crc32c"}},
		"ext4":               {depends: []string{"jbd2", "mbcache", "crc16"}, softPre: []string{"crypto-crc32c"}},
		"xfs":                {depends: []string{"libcrc32c"}},
	}}
}

func names(mods []module) []string {
	out := make([]string, len(mods))
	for i, m := range mods {
		out[i] = m.name
	}
	return out
}

func TestResolveModules(t *testing.T) {
	cycle := &fakeModules{infos: map[string]modInfo{
		"a": {depends: []string{"b"}},
		"b": {depends: []string{"a"}},
	}}
	withBuiltin := debian12()
	withBuiltin.builtins = map[string]bool{"loop": true, "crc32c_generic": true}
	tests := []struct {
		name      string
		src       *fakeModules
		requested []string
		want      []string
		wantErr   string
	}{
		{
			name:      "defaults",
			src:       debian12(),
			requested: DefaultModules,
			want: []string{
				"loop",
				"dm_bio_prison", "dm_bufio", "crc32c_generic", "libcrc32c", "dm_persistent_data", "dm_mod", "dm_thin_pool",
				"jbd2", "mbcache", "crc16", "ext4",
				"xfs",
			},
		},
		{
			name:      "dashes and underscores are one name, each module once",
			src:       debian12(),
			requested: []string{"dm-mod", "dm_mod", "dm-mod.ko"},
			want:      []string{"dm_mod"},
		},
		{
			name:      "soft dependency through an alias loads first",
			src:       debian12(),
			requested: []string{"xfs"},
			want:      []string{"crc32c_generic", "libcrc32c", "xfs"},
		},
		{
			name:      "built-in modules are skipped, also as soft dependencies",
			src:       withBuiltin,
			requested: []string{"loop", "xfs"},
			want:      []string{"libcrc32c", "xfs"},
		},
		{
			name:      "unknown module",
			src:       debian12(),
			requested: []string{"nope"},
			wantErr:   "module nope not found",
		},
		{
			name:      "missing hard dependency names who needs it",
			src:       &fakeModules{infos: map[string]modInfo{"a": {depends: []string{"gone"}}}},
			requested: []string{"a"},
			wantErr:   "module gone (needed by a) not found",
		},
		{
			name:      "missing soft dependency is ignored",
			src:       &fakeModules{infos: map[string]modInfo{"a": {softPre: []string{"gone"}}}},
			requested: []string{"a"},
			want:      []string{"a"},
		},
		{
			name:      "cycle",
			src:       cycle,
			requested: []string{"a"},
			wantErr:   "cycle",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := resolveModules(context.Background(), tt.src, tt.requested)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(names(got), tt.want) {
				t.Errorf("order = %v, want %v", names(got), tt.want)
			}
			assertTopological(t, tt.src, got)
		})
	}
}

// assertTopological checks that every hard dependency precedes its user.
func assertTopological(t *testing.T, src *fakeModules, order []module) {
	t.Helper()
	pos := map[string]int{}
	for i, m := range order {
		pos[m.name] = i
	}
	for i, m := range order {
		for _, d := range src.infos[m.name].depends {
			if p, ok := pos[normalizeModName(d)]; !ok || p > i {
				if !src.builtins[normalizeModName(d)] {
					t.Errorf("%s loads before its dependency %s", m.name, d)
				}
			}
		}
	}
}

func TestParseModinfo(t *testing.T) {
	raw := []byte("license=GPL\x00softdep=pre: crc32c post: foo\x00depends=dm-bufio,libcrc32c\x00" +
		"softdep=pre: a b\x00name=dm_persistent_data\x00vermagic=6.1.0 SMP\x00\x00\x00")
	got := parseModinfo(raw)
	want := modInfo{depends: []string{"dm-bufio", "libcrc32c"}, softPre: []string{"crc32c", "a", "b"}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("parseModinfo = %+v, want %+v", got, want)
	}
	if got := parseModinfo([]byte("depends=\x00")); len(got.depends) != 0 {
		t.Errorf("empty depends= gave %v", got.depends)
	}
}

func TestNormalizeModName(t *testing.T) {
	for in, want := range map[string]string{
		"dm-thin-pool":                         "dm_thin_pool",
		"dm_thin_pool":                         "dm_thin_pool",
		"/x/kernel/drivers/md/dm-thin-pool.ko": "dm_thin_pool",
		"xfs.ko.xz":                            "xfs",
		"ext4.ko.zst":                          "ext4",
	} {
		if got := normalizeModName(in); got != want {
			t.Errorf("normalizeModName(%q) = %q, want %q", in, got, want)
		}
	}
}
