package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"k8s.io/apimachinery/pkg/api/resource"
	"sigs.k8s.io/yaml"

	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// fileConfig is the pools configuration file (YAML or JSON):
//
//	defaultPool: fast
//	pools:
//	- name: fast
//	  dataDevice: /dev/disk/by-id/nvme-data
//	  metadataDevice: /dev/disk/by-id/nvme-meta
//	  overprovisionRatio: 5
//	- name: demo                     # loop files: demos and tests only
//	  dataFile: /var/lib/csi-dmthin/demo.data
//	  dataFileSize: 20Gi
//	  autoExtend: {thresholdPercent: 80, maxDataFileSize: 100Gi}
//
// Sizes are Kubernetes quantities (20Gi, 20G, 1.5Ti, 65536) of whole
// bytes. `csi-dmthin config check` and serve read it the same way and
// report every problem at once, each naming its pool's index and field.
type fileConfig struct {
	DefaultPool string       `json:"defaultPool,omitempty"`
	Pools       []poolConfig `json:"pools"`
}

type poolConfig struct {
	Name             string   `json:"name"`
	DataDevice       string   `json:"dataDevice,omitempty"`
	MetadataDevice   string   `json:"metadataDevice,omitempty"`
	DataFile         string   `json:"dataFile,omitempty"`
	MetadataFile     string   `json:"metadataFile,omitempty"`
	DataFileSize     quantity `json:"dataFileSize,omitempty"`
	MetadataFileSize quantity `json:"metadataFileSize,omitempty"`
	BlockSize        quantity `json:"blockSize,omitempty"` // default 64Ki
	// LowWaterMark is a size (1Gi) or a percentage of the data device
	// (10%): the kernel raises an event when free data falls under it,
	// which wakes the driver's pool watcher at once. Default 1%, or with
	// autoExtend the free space left at its threshold.
	LowWaterMark     quantity `json:"lowWaterMark,omitempty"`
	SkipBlockZeroing bool     `json:"skipBlockZeroing,omitempty"`
	QueueIfNoSpace   bool     `json:"queueIfNoSpace,omitempty"`
	// Wipe lets a new pool be made over devices that hold something: their
	// first and last MiB are erased. It matters only when the pool is made.
	Wipe            bool    `json:"wipe,omitempty"`
	MinFreeData     float64 `json:"minFreeDataPercent,omitempty"`
	MinFreeMetadata float64 `json:"minFreeMetadataPercent,omitempty"`
	Overprovision   float64 `json:"overprovisionRatio,omitempty"`
	// AutoExtend grows a loop-file pool by itself when its data or
	// metadata use passes a threshold, up to a maximum.
	AutoExtend *autoExtendConfig `json:"autoExtend,omitempty"`
}

// autoExtendConfig is a loop-file pool's autoExtend.
type autoExtendConfig struct {
	// ThresholdPercent: grow when data or metadata use reaches this.
	ThresholdPercent float64 `json:"thresholdPercent"`
	// StepPercent: grow the files by this share of their size (default 20).
	StepPercent float64 `json:"stepPercent,omitempty"`
	// MaxDataFileSize: the data file never grows past this.
	MaxDataFileSize quantity `json:"maxDataFileSize"`
}

// quantity is a size as the pools file writes it: a Kubernetes quantity, as
// a string or a plain number.
type quantity string

func (q *quantity) UnmarshalJSON(b []byte) error {
	if len(b) > 0 && b[0] == '"' {
		var s string
		if err := json.Unmarshal(b, &s); err != nil {
			return err
		}
		*q = quantity(s)
		return nil
	}
	var n json.Number
	d := json.NewDecoder(bytes.NewReader(b))
	d.UseNumber()
	if err := d.Decode(&n); err != nil {
		return fmt.Errorf("want a size such as 20Gi, not %s", b)
	}
	*q = quantity(n.String())
	return nil
}

// maxSizeBytes keeps sizes far from overflow (an exbibyte).
const maxSizeBytes = 1 << 60

// bytes reads a size in whole bytes; 0 for an empty one.
func (q quantity) bytes() (int64, error) {
	if q == "" {
		return 0, nil
	}
	v, err := resource.ParseQuantity(string(q))
	if err != nil {
		return 0, fmt.Errorf("%q is not a size: want a Kubernetes quantity such as 20Gi, 20G, 1.5Ti or 65536", string(q))
	}
	n := v.Value()
	switch {
	case v.Sign() < 0:
		return 0, fmt.Errorf("%q is negative", string(q))
	case v.Cmp(*resource.NewQuantity(n, resource.BinarySI)) != 0:
		return 0, fmt.Errorf("%q is not a whole number of bytes", string(q))
	case n > maxSizeBytes:
		return 0, fmt.Errorf("%q is larger than 1Ei", string(q))
	}
	return n, nil
}

// percent reads "12.5%"; ok is false when q is not a percentage.
func (q quantity) percent() (pct float64, ok bool, err error) {
	s, ok := strings.CutSuffix(strings.TrimSpace(string(q)), "%")
	if !ok {
		return 0, false, nil
	}
	pct, err = strconv.ParseFloat(strings.TrimSpace(s), 64)
	if err != nil || pct <= 0 || pct >= 100 {
		return 0, true, fmt.Errorf("%q: want a percentage over 0 and under 100", string(q))
	}
	return pct, true, nil
}

// autoExtend is a loop-file pool's autoExtend, read.
type autoExtend struct {
	thresholdPercent float64
	stepPercent      float64
	maxDataBytes     int64
}

// nodeConfig is a pools file, read and checked.
type nodeConfig struct {
	pools       map[string]thinpool.Config
	order       []string // the pools in the file's order
	defaultPool string
	autoExtend  map[string]autoExtend // loop-file pools that have it
}

// configError lists every problem with a pools file, one a line.
type configError struct {
	path     string
	problems []string
}

func (e *configError) Error() string {
	if len(e.problems) == 1 {
		return fmt.Sprintf("pools config %s: %s", e.path, e.problems[0])
	}
	return fmt.Sprintf("pools config %s: %d problems:\n  %s", e.path, len(e.problems), strings.Join(e.problems, "\n  "))
}

// fileField names thinpool.Config's fields as the pools file does.
var fileField = map[string]string{
	"dataFileBytes":     "dataFileSize",
	"metadataFileBytes": "metadataFileSize",
	"blockSectors":      "blockSize",
	"lowWaterBlocks":    "lowWaterMark",
	"lowWaterPercent":   "lowWaterMark",
	"stateDir":          "(--state-dir)",
}

// defaultAutoExtendStep is autoExtend.stepPercent's default.
const defaultAutoExtendStep = 20

// loadConfig reads the pools file and turns it into thinpool configs, each
// with its records under stateDir; see loadNodeConfig.
func loadConfig(path, stateDir string) (map[string]thinpool.Config, string, error) {
	nc, err := loadNodeConfig(path, stateDir)
	if err != nil {
		return nil, "", err
	}
	return nc.pools, nc.defaultPool, nil
}

// loadNodeConfig reads the pools file and checks everything that can be
// checked without the kernel or the devices. Its error, a *configError,
// lists every problem found, each naming the pool's index and field.
func loadNodeConfig(path, stateDir string) (*nodeConfig, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("pools config: %w", err)
	}
	var fc fileConfig
	if err := yaml.UnmarshalStrict(b, &fc); err != nil {
		return nil, &configError{path: path, problems: []string{err.Error()}}
	}
	ce := &configError{path: path}
	bad := func(format string, a ...any) { ce.problems = append(ce.problems, fmt.Sprintf(format, a...)) }
	if len(fc.Pools) == 0 {
		bad("pools: no pools")
	}
	nc := &nodeConfig{pools: map[string]thinpool.Config{}, defaultPool: fc.DefaultPool, autoExtend: map[string]autoExtend{}}
	// Which pool uses which path, so that two pools cannot share one.
	usedBy := map[string]string{}
	for i, p := range fc.Pools {
		field := func(f string) string { return fmt.Sprintf("pools[%d].%s", i, f) }
		if _, dup := nc.pools[p.Name]; dup && p.Name != "" {
			bad("%s: pool %q is listed twice", field("name"), p.Name)
			continue
		}
		c := thinpool.Config{
			Name: p.Name, StateDir: stateDir,
			DataDevice: p.DataDevice, MetadataDevice: p.MetadataDevice,
			DataFile: p.DataFile, MetadataFile: p.MetadataFile,
			SkipBlockZeroing: p.SkipBlockZeroing, QueueIfNoSpace: p.QueueIfNoSpace, Wipe: p.Wipe,
			MinFreeDataPercent: p.MinFreeData, MinFreeMetadataPercent: p.MinFreeMetadata,
			OverprovisionRatio: p.Overprovision,
		}
		if c.DataFile != "" && c.MetadataFile == "" {
			c.MetadataFile = strings.TrimSuffix(c.DataFile, filepath.Ext(c.DataFile)) + ".meta"
		}
		size := func(f string, q quantity) int64 {
			n, err := q.bytes()
			if err != nil {
				bad("%s: %v", field(f), err)
			}
			return n
		}
		c.DataFileBytes = size("dataFileSize", p.DataFileSize)
		c.MetadataFileBytes = size("metadataFileSize", p.MetadataFileSize)
		if n := size("blockSize", p.BlockSize); n%thinpool.SectorSize != 0 {
			bad("%s: %d is not a whole number of 512-byte sectors", field("blockSize"), n)
		} else if n/thinpool.SectorSize > 1<<32-1 {
			bad("%s: %d bytes is too large", field("blockSize"), n)
		} else {
			c.BlockSectors = uint32(n / thinpool.SectorSize)
		}
		if pct, isPct, err := p.LowWaterMark.percent(); err != nil {
			bad("%s: %v", field("lowWaterMark"), err)
		} else if isPct {
			c.LowWaterPercent = pct
		} else if n := size("lowWaterMark", p.LowWaterMark); n > 0 {
			bs := int64(c.BlockSectors) * thinpool.SectorSize
			if bs == 0 {
				bs = 64 << 10
			}
			c.LowWaterBlocks = uint64((n + bs - 1) / bs)
		}
		if ae := p.AutoExtend; ae != nil {
			a := autoExtend{thresholdPercent: ae.ThresholdPercent, stepPercent: ae.StepPercent}
			if a.stepPercent == 0 {
				a.stepPercent = defaultAutoExtendStep
			}
			a.maxDataBytes = size("autoExtend.maxDataFileSize", ae.MaxDataFileSize)
			switch {
			case p.DataFile == "":
				bad("%s: only a loop-file pool grows by itself; grow a device (lvextend), then run `csi-dmthin pool grow %s`", field("autoExtend"), p.Name)
			case a.thresholdPercent <= 0 || a.thresholdPercent >= 100:
				bad("%s: %v: want over 0 and under 100", field("autoExtend.thresholdPercent"), ae.ThresholdPercent)
			case a.stepPercent <= 0 || a.stepPercent > 1000:
				bad("%s: %v: want over 0 and at most 1000", field("autoExtend.stepPercent"), ae.StepPercent)
			case a.maxDataBytes == 0:
				bad("%s: required: the size the data file never grows past", field("autoExtend.maxDataFileSize"))
			case a.maxDataBytes < c.DataFileBytes:
				bad("%s: %s is smaller than dataFileSize %s", field("autoExtend.maxDataFileSize"), ae.MaxDataFileSize, p.DataFileSize)
			default:
				nc.autoExtend[p.Name] = a
				if p.LowWaterMark == "" {
					// The kernel's event then comes exactly at the threshold.
					c.LowWaterPercent = 100 - a.thresholdPercent
				}
			}
		}
		for _, err := range c.Check() {
			var fe *thinpool.FieldError
			if errors.As(err, &fe) {
				name := fe.Field
				if n, ok := fileField[name]; ok {
					name = n
				}
				bad("%s: %s", field(name), strings.TrimPrefix(fe.Err.Error(), thinpool.ErrInvalid.Error()+": "))
				continue
			}
			bad("%s: %v", field("name"), err)
		}
		for _, u := range []struct{ field, path string }{
			{"dataDevice", p.DataDevice}, {"metadataDevice", p.MetadataDevice},
			{"dataFile", c.DataFile}, {"metadataFile", c.MetadataFile},
		} {
			if u.path == "" {
				continue
			}
			clean := filepath.Clean(u.path)
			if other, taken := usedBy[clean]; taken {
				bad("%s: %s is used by %s too: a device or file belongs to one pool", field(u.field), u.path, other)
				continue
			}
			usedBy[clean] = field(u.field)
		}
		if p.Name != "" {
			nc.pools[p.Name] = c
			nc.order = append(nc.order, p.Name)
		}
	}
	if fc.DefaultPool != "" {
		if _, ok := nc.pools[fc.DefaultPool]; !ok {
			bad("defaultPool: %q is not among the pools", fc.DefaultPool)
		}
	}
	if len(ce.problems) > 0 {
		return nil, ce
	}
	return nc, nil
}

// configCheck is `csi-dmthin config check`: it reads a pools file as serve
// does, without the kernel, and prints every problem, or what it found.
func configCheck(args []string) error {
	fs := newFlagSet("config check")
	path := fs.String("config", "/etc/csi-dmthin/pools.yaml", "the pools file to check")
	stateDir := fs.String("state-dir", defaultStateDir, "the state directory serve would use (only its name is checked)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return usageError{fmt.Errorf("config check takes flags only, not %q", fs.Args())}
	}
	nc, err := loadNodeConfig(*path, *stateDir)
	if err != nil {
		return err
	}
	names := append([]string(nil), nc.order...)
	sort.Strings(names)
	def := nc.defaultPool
	if def == "" {
		def = "(none: StorageClasses must name a pool)"
	}
	fmt.Printf("%s: %d pools (%s), default pool %s\n", *path, len(names), strings.Join(names, ", "), def)
	for _, n := range nc.order {
		c := nc.pools[n]
		kind := "devices " + c.DataDevice + ", " + c.MetadataDevice
		if c.DataFile != "" {
			kind = "loop files " + c.DataFile + ", " + c.MetadataFile
		}
		extra := ""
		if a, ok := nc.autoExtend[n]; ok {
			extra = fmt.Sprintf("; grows by itself at %.0f%% use, by %.0f%%, up to %s", a.thresholdPercent, a.stepPercent, gib(a.maxDataBytes))
		}
		fmt.Printf("  %s: %s%s\n", n, kind, extra)
	}
	return nil
}

// defaultLowWater puts the low water mark of every pool that names none
// (and has no autoExtend, which sets its own) where the Node's
// nearly-full warning is: the kernel's event then wakes the warning, the
// ThinPool status and the capacity at once, instead of at the next poll.
func defaultLowWater(nc *nodeConfig, fullPercent float64) {
	if fullPercent <= 0 || fullPercent >= 100 {
		return
	}
	for n, c := range nc.pools {
		if c.LowWaterBlocks == 0 && c.LowWaterPercent == 0 {
			c.LowWaterPercent = 100 - fullPercent
			nc.pools[n] = c
		}
	}
}
