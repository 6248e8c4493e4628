package blockcopy

import (
	"context"
	"net/url"
)

// SourceInfo is what a server says of a source when a copy opens it.
type SourceInfo struct {
	SizeBytes int64
	Extents   []Extent
}

// MappedBytes is the sum of the extents' lengths: what a copy moves.
func (i SourceInfo) MappedBytes() int64 { return mappedBytes(i.Extents, 0) }

// Probe opens sourceID for copyID at ep with token, releases it, and says
// what a copy would move: an operator's check that a node can copy from
// another (the pin, the token and the source), moving no data.
func Probe(ctx context.Context, ep Endpoint, token, copyID, sourceID string) (SourceInfo, error) {
	if err := validateID("copyID", copyID); err != nil {
		return SourceInfo{}, err
	}
	if err := validateSourceID(sourceID); err != nil {
		return SourceInfo{}, err
	}
	c, err := newClient(ep, func() (string, error) { return token, nil })
	if err != nil {
		return SourceInfo{}, err
	}
	defer c.hc.CloseIdleConnections()
	var info openResponse
	if err := c.postJSON(ctx, "/v1/copies/"+url.PathEscape(copyID)+"/open", openRequest{SourceID: sourceID}, &info); err != nil {
		return SourceInfo{}, err
	}
	resp, err := c.do(ctx, "DELETE", "/v1/copies/"+url.PathEscape(copyID), nil, nil)
	if err != nil {
		return SourceInfo{}, err
	}
	resp.Body.Close()
	return SourceInfo{SizeBytes: info.SizeBytes, Extents: info.Extents}, nil
}
