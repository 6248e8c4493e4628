package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"sigs.k8s.io/yaml"

	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// fileConfig is the pools configuration file (YAML or JSON):
//
//	defaultPool: fast
//	pools:
//	- name: fast
//	  dataDevice: /dev/nvme1n1
//	  metadataDevice: /dev/nvme2n1
//	  overprovisionRatio: 5
//	- name: demo                     # loop files: demos and tests only
//	  dataFile: /var/lib/csi-dmthin/demo.data
//	  dataFileSize: 20Gi
type fileConfig struct {
	DefaultPool string       `json:"defaultPool,omitempty"`
	Pools       []poolConfig `json:"pools"`
}

type poolConfig struct {
	Name             string  `json:"name"`
	DataDevice       string  `json:"dataDevice,omitempty"`
	MetadataDevice   string  `json:"metadataDevice,omitempty"`
	DataFile         string  `json:"dataFile,omitempty"`
	MetadataFile     string  `json:"metadataFile,omitempty"`
	DataFileSize     string  `json:"dataFileSize,omitempty"`
	MetadataFileSize string  `json:"metadataFileSize,omitempty"`
	BlockSize        string  `json:"blockSize,omitempty"` // default 64Ki
	LowWaterMark     string  `json:"lowWaterMark,omitempty"`
	SkipBlockZeroing bool    `json:"skipBlockZeroing,omitempty"`
	QueueIfNoSpace   bool    `json:"queueIfNoSpace,omitempty"`
	MinFreeData      float64 `json:"minFreeDataPercent,omitempty"`
	MinFreeMetadata  float64 `json:"minFreeMetadataPercent,omitempty"`
	Overprovision    float64 `json:"overprovisionRatio,omitempty"`
}

// parseSize reads a byte count: a plain number or one with a binary suffix
// (Ki, Mi, Gi, Ti, Pi), as Kubernetes quantities write them.
func parseSize(field, s string) (int64, error) {
	if s == "" {
		return 0, nil
	}
	mult := int64(1)
	for i, suf := range []string{"Ki", "Mi", "Gi", "Ti", "Pi"} {
		if strings.HasSuffix(s, suf) {
			mult = 1 << (10 * (i + 1))
			s = strings.TrimSuffix(s, suf)
			break
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 || n > (1<<62)/mult {
		return 0, fmt.Errorf("%s: %q is not a size (a number of bytes, optionally with Ki, Mi, Gi, Ti or Pi)", field, s)
	}
	return n * mult, nil
}

// loadConfig reads the pools file and turns it into thinpool configs, each
// with its records under stateDir.
func loadConfig(path, stateDir string) (map[string]thinpool.Config, string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, "", fmt.Errorf("pools config: %w", err)
	}
	var fc fileConfig
	if err := yaml.UnmarshalStrict(b, &fc); err != nil {
		return nil, "", fmt.Errorf("pools config %s: %w", path, err)
	}
	if len(fc.Pools) == 0 {
		return nil, "", fmt.Errorf("pools config %s: no pools", path)
	}
	out := map[string]thinpool.Config{}
	for i, p := range fc.Pools {
		field := func(f string) string { return fmt.Sprintf("pools[%d].%s", i, f) }
		if _, dup := out[p.Name]; dup {
			return nil, "", fmt.Errorf("pools config %s: %s: pool %q is listed twice", path, field("name"), p.Name)
		}
		c := thinpool.Config{
			Name: p.Name, StateDir: stateDir,
			DataDevice: p.DataDevice, MetadataDevice: p.MetadataDevice,
			DataFile: p.DataFile, MetadataFile: p.MetadataFile,
			SkipBlockZeroing: p.SkipBlockZeroing, QueueIfNoSpace: p.QueueIfNoSpace,
			MinFreeDataPercent: p.MinFreeData, MinFreeMetadataPercent: p.MinFreeMetadata,
			OverprovisionRatio: p.Overprovision,
		}
		if c.DataFile != "" && c.MetadataFile == "" {
			c.MetadataFile = strings.TrimSuffix(c.DataFile, filepath.Ext(c.DataFile)) + ".meta"
		}
		var errs []error
		var n int64
		if c.DataFileBytes, err = parseSize(field("dataFileSize"), p.DataFileSize); err != nil {
			errs = append(errs, err)
		}
		if c.MetadataFileBytes, err = parseSize(field("metadataFileSize"), p.MetadataFileSize); err != nil {
			errs = append(errs, err)
		}
		if n, err = parseSize(field("blockSize"), p.BlockSize); err != nil {
			errs = append(errs, err)
		} else if n%512 != 0 {
			errs = append(errs, fmt.Errorf("%s: %d is not a whole number of 512-byte sectors", field("blockSize"), n))
		} else {
			c.BlockSectors = uint32(n / 512)
		}
		if n, err = parseSize(field("lowWaterMark"), p.LowWaterMark); err != nil {
			errs = append(errs, err)
		} else if n > 0 {
			bs := int64(c.BlockSectors) * 512
			if bs == 0 {
				bs = 64 << 10
			}
			c.LowWaterBlocks = uint64((n + bs - 1) / bs)
		}
		if err := errors.Join(errs...); err != nil {
			return nil, "", fmt.Errorf("pools config %s: %w", path, err)
		}
		out[p.Name] = c
	}
	if fc.DefaultPool != "" {
		if _, ok := out[fc.DefaultPool]; !ok {
			return nil, "", fmt.Errorf("pools config %s: defaultPool %q is not among the pools", path, fc.DefaultPool)
		}
	}
	return out, fc.DefaultPool, nil
}
