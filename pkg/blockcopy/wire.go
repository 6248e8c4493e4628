package blockcopy

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
)

// The wire protocol, HTTP/1.1 or HTTP/2 over TLS 1.3, every request with
// "Authorization: Bearer <token>":
//
//	POST   /v1/copies/{copyID}/open    body openRequest   -> openResponse
//	GET    /v1/copies/{copyID}/data?sourceID=S&extentsSHA256=H&offset=N
//	                                                       -> a stream of frames
//	GET    /v1/copies/{copyID}/digest?sourceID=S&extentsSHA256=H
//	                                                       -> digestResponse
//	DELETE /v1/copies/{copyID}                             -> 204
//
// data and digest open the source again when the server no longer has it
// (it restarted, or released it as idle), which the Opener's contract
// makes give the same bytes; extentsSHA256 makes the server refuse (409)
// a source that changed under a copy anyway. Errors are a status with a
// text/plain body saying why.
//
// The data stream is a sequence of frames, each a kind byte then:
//
//	'D' data:  offset uint64, length uint32 (big-endian), length bytes
//	'E' end:   total uint64, the data bytes of this stream
//	'X' error: length uint32, length bytes of message
//
// Data frames cover, in order, the mapped bytes from the requested offset
// on, at most maxFramePayload each. A stream that ends without 'E' broke
// (the client reconnects); 'X' is the source failing (the client gives up).
const (
	frameData  byte = 'D'
	frameEnd   byte = 'E'
	frameError byte = 'X'

	maxFramePayload = 1 << 20
	maxErrorMessage = 4 << 10
)

type openRequest struct {
	SourceID string `json:"sourceID"`
}

type openResponse struct {
	SizeBytes      int64    `json:"sizeBytes"`
	BlockSizeBytes int64    `json:"blockSizeBytes,omitempty"`
	Extents        []Extent `json:"extents"`
	ExtentsSHA256  string   `json:"extentsSHA256"`
}

type digestResponse struct {
	SHA256 string `json:"sha256"`
}

// BlockSizer is what a Source may also implement to report its block
// size, which the server passes on to the client (0 when it does not).
type BlockSizer interface {
	BlockSizeBytes() int64
}

// ExtentsSHA256 is the hex SHA-256 of a device's size and extents list
// (each a big-endian uint64): what a checkpoint is bound to.
func ExtentsSHA256(sizeBytes int64, extents []Extent) string {
	h := sha256.New()
	var b [16]byte
	binary.BigEndian.PutUint64(b[:8], uint64(sizeBytes))
	h.Write(b[:8])
	for _, e := range extents {
		binary.BigEndian.PutUint64(b[:8], uint64(e.Offset))
		binary.BigEndian.PutUint64(b[8:], uint64(e.Length))
		h.Write(b[:])
	}
	return hex.EncodeToString(h.Sum(nil))
}

// DigestSHA256 is the hex SHA-256, over every extent in order, of its
// offset and length (big-endian uint64) and its bytes as r reads them:
// the source's digest on the server, the target's on the client.
func DigestSHA256(r io.ReaderAt, extents []Extent) (string, error) {
	h := sha256.New()
	buf := make([]byte, maxFramePayload)
	var b [16]byte
	for _, e := range extents {
		binary.BigEndian.PutUint64(b[:8], uint64(e.Offset))
		binary.BigEndian.PutUint64(b[8:], uint64(e.Length))
		h.Write(b[:])
		for off := e.Offset; off < e.Offset+e.Length; {
			n := min(int64(len(buf)), e.Offset+e.Length-off)
			if err := readFull(r, buf[:n], off); err != nil {
				return "", err
			}
			h.Write(buf[:n])
			off += n
		}
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// readFull reads len(p) bytes at off; io.EOF with every byte read is no
// error (ReaderAt allows either at the end of a device).
func readFull(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("read %d bytes at offset %d: %w", len(p), off, err)
}

// checkExtents checks what a Source reports: extents inside the device,
// positive, sorted and not overlapping.
func checkExtents(sizeBytes int64, extents []Extent) error {
	if sizeBytes < 0 {
		return fmt.Errorf("negative size %d", sizeBytes)
	}
	var end int64
	for i, e := range extents {
		if e.Offset < end || e.Length <= 0 || e.Offset+e.Length > sizeBytes || e.Offset+e.Length < e.Offset {
			return fmt.Errorf("extent %d (offset %d, length %d) is empty, overlaps the one before or ends past the size %d", i, e.Offset, e.Length, sizeBytes)
		}
		end = e.Offset + e.Length
	}
	return nil
}

// mappedBytes is the sum of the extents' lengths at or after offset.
func mappedBytes(extents []Extent, from int64) int64 {
	var n int64
	for _, e := range extents {
		if end := e.Offset + e.Length; end > from {
			n += end - max(e.Offset, from)
		}
	}
	return n
}

func writeDataHeader(w io.Writer, off int64, n int) error {
	var b [13]byte
	b[0] = frameData
	binary.BigEndian.PutUint64(b[1:9], uint64(off))
	binary.BigEndian.PutUint32(b[9:13], uint32(n))
	_, err := w.Write(b[:])
	return err
}

func writeEnd(w io.Writer, total int64) error {
	var b [9]byte
	b[0] = frameEnd
	binary.BigEndian.PutUint64(b[1:], uint64(total))
	_, err := w.Write(b[:])
	return err
}

func writeErrorFrame(w io.Writer, msg string) error {
	if len(msg) > maxErrorMessage {
		msg = msg[:maxErrorMessage]
	}
	b := make([]byte, 5+len(msg))
	b[0] = frameError
	binary.BigEndian.PutUint32(b[1:5], uint32(len(msg)))
	copy(b[5:], msg)
	_, err := w.Write(b)
	return err
}
