//go:build !linux

package safepath

import (
	"errors"
	"os"
)

var errUnsupported = errors.New("safepath: needs Linux (openat2)")

func (r Root) Lookup(string) (*Path, error)                   { return nil, errUnsupported }
func (r Root) MkdirAll(string, os.FileMode) ([]string, error) { return nil, errUnsupported }
func (r Root) Remove(string) error                            { return errUnsupported }
func (p *Path) Open() (*os.File, error)                       { return nil, errUnsupported }
func (p *Path) Stat() (os.FileInfo, error)                    { return nil, errUnsupported }
func (p *Path) Mkdir(os.FileMode) (bool, error)               { return false, errUnsupported }
func (p *Path) CreateFile(os.FileMode) (bool, error)          { return false, errUnsupported }
func (p *Path) Remove() error                                 { return errUnsupported }
func (p *Path) InParent() string                              { return "" }
