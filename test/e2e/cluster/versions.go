package cluster

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Versions is test/e2e/versions.env: key -> value.
type Versions map[string]string

// Get returns the value of key, or an error naming the file if it is unset.
func (v Versions) Get(key string) (string, error) {
	if s := v[key]; s != "" {
		return s, nil
	}
	return "", fmt.Errorf("cluster: versions.env has no %s", key)
}

// RepoRoot finds the repository root: the first directory at or above the
// working directory that holds test/e2e/versions.env.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "test", "e2e", "versions.env")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("cluster: no test/e2e/versions.env above the working directory")
		}
		dir = parent
	}
}

// ReadVersions parses versions.env: KEY=value lines, blank lines and '#'
// comments.
func ReadVersions(path string) (Versions, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	v := Versions{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, val, ok := strings.Cut(line, "=")
		if !ok || k == "" || val == "" {
			return nil, fmt.Errorf("%s:%d: want KEY=value, got %q", path, n, line)
		}
		v[k] = val
	}
	return v, sc.Err()
}
