package thinpool

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"hash/fnv"
	"sort"
	"strconv"
	"strings"
)

// The power-cut test's log and model, shared by the host orchestrator
// (powercut_test.go) and the guest workload (powercut_kernel_test.go).
//
// The guest prints, with vmtest.Emit (so the host has each line before the
// guest goes on), one line before each call and one after it returns:
//
//	PC begin <n> create <name> <sizeBytes>
//	PC begin <n> snapshot <name> <source>
//	PC begin <n> clone <name> <source> <sizeBytes>
//	PC begin <n> delete|activate|deactivate <name>
//	PC begin <n> grow <name> <sizeBytes>
//	PC begin <n> write <name> <slot>     (written, then fsync'd)
//	PC ack <n>
//
// The host keeps these lines across boots and hands them to the next boot,
// which replays them into the state every acknowledged operation promises.
// A power cut leaves at most one operation begun and not acknowledged, the
// last one; the next boot finds it done or not (a write: each 4 KiB block
// old or new) and settles it, so the log stays exact:
//
//	PC settle <n> done|undone
//	PC settle <n> torn <hex mask of the slot's new blocks>
//
// Each of these lines ends in " ~" and the CRC-32 of what precedes it, so
// that a line damaged on its way fails the replay rather than changing the
// promise.

const (
	pcSlots         = 8        // data slots per volume
	pcSlotBytes     = 64 << 10 // one pool block (128 sectors)
	pcSlotStride    = 1 << 20  // slot i starts at i MiB
	pcBlockBytes    = 4096
	pcBlocksPerSlot = pcSlotBytes / pcBlockBytes
	pcMinVolBytes   = pcSlots * pcSlotStride // every volume holds every slot
	pcLinePrefix    = "PC "
)

// What the host tells each boot, in the guest's environment. pcEnvLog is
// also what tells the guest test that the orchestrator runs it.
const (
	pcEnvLog     = "CSI_DMTHIN_POWERCUT_LOG"      // guest path of the acknowledged log
	pcEnvBoot    = "CSI_DMTHIN_POWERCUT_BOOT"     // boot number, from 0
	pcEnvSeed    = "CSI_DMTHIN_POWERCUT_SEED"     // the workload's random seed (with the boot number)
	pcEnvFinal   = "CSI_DMTHIN_POWERCUT_FINAL"    // "1": verify, tear down, exit
	pcEnvMaxWork = "CSI_DMTHIN_POWERCUT_MAX_WORK" // how long the workload waits for a cut before it fails
)

// The disks' serials: the pool's data and metadata, and the ext4
// filesystem that holds the records.
const (
	pcSerialData  = "pc-data"
	pcSerialMeta  = "pc-meta"
	pcSerialState = "pc-state"
)

// pcBlockGarbage marks an observed block that is neither zeros nor any
// write's pattern.
const pcBlockGarbage = -1

// pcVol is what the log promises about one volume: its record and, for
// each 4 KiB block of its slots, the write whose pattern it holds (0:
// zeros, never written).
type pcVol struct {
	Kind   Kind
	Source string
	Size   int64
	Active bool
	Blocks [pcSlots * pcBlocksPerSlot]int
}

// pcOp is one begun operation.
type pcOp struct {
	N      int
	Verb   string
	Name   string
	Source string
	Size   int64
	Slot   int
}

func (o pcOp) String() string {
	switch o.Verb {
	case "create", "grow":
		return fmt.Sprintf("%d %s %s %d", o.N, o.Verb, o.Name, o.Size)
	case "snapshot":
		return fmt.Sprintf("%d %s %s %s", o.N, o.Verb, o.Name, o.Source)
	case "clone":
		return fmt.Sprintf("%d %s %s %s %d", o.N, o.Verb, o.Name, o.Source, o.Size)
	case "write":
		return fmt.Sprintf("%d %s %s %d", o.N, o.Verb, o.Name, o.Slot)
	}
	return fmt.Sprintf("%d %s %s", o.N, o.Verb, o.Name)
}

// beginLine is the line the guest prints before the call.
func (o pcOp) beginLine() string { return pcLinePrefix + "begin " + o.String() }

func parsePCOp(f []string) (pcOp, error) {
	fields := map[string]int{"create": 4, "grow": 4, "snapshot": 4, "clone": 5, "write": 4, "delete": 3, "activate": 3, "deactivate": 3}
	if len(f) < 2 {
		return pcOp{}, fmt.Errorf("too few fields")
	}
	want, ok := fields[f[1]]
	if !ok {
		return pcOp{}, fmt.Errorf("unknown operation %q", f[1])
	}
	if len(f) != want {
		return pcOp{}, fmt.Errorf("%s takes %d fields, not %d", f[1], want, len(f))
	}
	n, err := strconv.Atoi(f[0])
	if err != nil {
		return pcOp{}, err
	}
	o := pcOp{N: n, Verb: f[1], Name: f[2]}
	switch o.Verb {
	case "create", "grow":
		o.Size, err = strconv.ParseInt(f[3], 10, 64)
	case "snapshot":
		o.Source = f[3]
	case "clone":
		o.Source = f[3]
		o.Size, err = strconv.ParseInt(f[4], 10, 64)
	case "write":
		o.Slot, err = strconv.Atoi(f[3])
		if err == nil && (o.Slot < 0 || o.Slot >= pcSlots) {
			err = fmt.Errorf("slot %d", o.Slot)
		}
	}
	return o, err
}

// pcModel is the state the log promises.
type pcModel struct {
	vols    map[string]pcVol
	next    int   // the number the next begin carries
	pending *pcOp // begun, neither acknowledged nor settled
	writers map[int]string

	acked, settledDone, settledUndone, settledTorn int
}

func newPCModel() *pcModel {
	return &pcModel{vols: map[string]pcVol{}, next: 1, writers: map[int]string{}}
}

// replayPC builds the model from a log.
func replayPC(lines []string) (*pcModel, error) {
	m := newPCModel()
	for i, l := range lines {
		if err := m.feed(l); err != nil {
			return nil, fmt.Errorf("log line %d %q: %w", i+1, l, err)
		}
	}
	return m, nil
}

// isPCLogLine says whether a line belongs in the log the host keeps.
func isPCLogLine(l string) bool {
	for _, k := range []string{"begin ", "ack ", "settle "} {
		if strings.HasPrefix(l, pcLinePrefix+k) {
			return true
		}
	}
	return false
}

// pcSeal appends the checksum to a log line.
func pcSeal(line string) string {
	return fmt.Sprintf("%s ~%08x", line, crc32.ChecksumIEEE([]byte(line)))
}

// pcUnseal checks and strips a log line's checksum.
func pcUnseal(sealed string) (string, error) {
	i := strings.LastIndex(sealed, " ~")
	if i < 0 {
		return "", fmt.Errorf("no checksum")
	}
	line := sealed[:i]
	if sealed[i+2:] != fmt.Sprintf("%08x", crc32.ChecksumIEEE([]byte(line))) {
		return "", fmt.Errorf("bad checksum")
	}
	return line, nil
}

// feed applies one (sealed) log line.
func (m *pcModel) feed(sealed string) error {
	line, err := pcUnseal(sealed)
	if err != nil {
		return err
	}
	f := strings.Fields(strings.TrimPrefix(line, pcLinePrefix))
	if len(f) < 2 || !strings.HasPrefix(line, pcLinePrefix) {
		return fmt.Errorf("not a log line")
	}
	switch f[0] {
	case "begin":
		o, err := parsePCOp(f[1:])
		if err != nil {
			return err
		}
		if m.pending != nil {
			return fmt.Errorf("operation %d begun while %d is pending", o.N, m.pending.N)
		}
		if o.N != m.next {
			return fmt.Errorf("operation %d begun, want %d", o.N, m.next)
		}
		if _, err := m.apply(o, m.vols, 0); err != nil {
			return fmt.Errorf("operation %s: %w", o, err)
		}
		m.pending, m.next = &o, m.next+1
		if o.Verb == "write" {
			m.writers[o.N] = o.Name
		}
		return nil
	case "ack", "settle":
		n, err := strconv.Atoi(f[1])
		if err != nil {
			return err
		}
		if m.pending == nil || m.pending.N != n {
			return fmt.Errorf("%s of operation %d, which is not the pending one", f[0], n)
		}
		mask := uint16(1<<pcBlocksPerSlot - 1)
		switch {
		case f[0] == "ack" && len(f) == 2:
			m.acked++
		case f[0] == "settle" && len(f) == 3 && f[2] == "done":
			m.settledDone++
		case f[0] == "settle" && len(f) == 3 && f[2] == "undone":
			m.settledUndone++
			m.pending = nil
			return nil
		case f[0] == "settle" && len(f) == 4 && f[2] == "torn" && m.pending.Verb == "write":
			v, err := strconv.ParseUint(f[3], 16, 16)
			if err != nil {
				return err
			}
			mask = uint16(v)
			m.settledTorn++
		default:
			return fmt.Errorf("malformed %s", f[0])
		}
		vols, err := m.apply(*m.pending, m.vols, mask)
		if err != nil {
			return err
		}
		m.vols, m.pending = vols, nil
		return nil
	}
	return fmt.Errorf("unknown line kind %q", f[0])
}

// apply returns vols with the operation done (for a write, to the blocks
// of its slot in mask), or why the operation does not fit vols. vols is
// not changed.
func (m *pcModel) apply(o pcOp, vols map[string]pcVol, mask uint16) (map[string]pcVol, error) {
	v, exists := vols[o.Name]
	needs := func(cond bool, why string) error {
		if !cond {
			return fmt.Errorf("%s", why)
		}
		return nil
	}
	out := make(map[string]pcVol, len(vols)+1)
	for k, x := range vols {
		out[k] = x
	}
	// A create, snapshot or clone of a name that exists is a retry, as a
	// CO retries a call it got no answer to: it must find what it would
	// make, and changes nothing. So is a delete of what is gone.
	switch {
	case (o.Verb == "create" || o.Verb == "snapshot" || o.Verb == "clone") && exists:
		without := make(map[string]pcVol, len(vols))
		for k, x := range vols {
			if k != o.Name {
				without[k] = x
			}
		}
		made, err := m.apply(o, without, mask)
		if err != nil {
			return nil, err
		}
		if w := made[o.Name]; w.Kind != v.Kind || w.Size != v.Size || w.Source != v.Source {
			return nil, fmt.Errorf("%s exists as a %s of %d bytes from %q; %s makes a %s of %d bytes from %q", o.Name, v.Kind, v.Size, v.Source, o.Verb, w.Kind, w.Size, w.Source)
		}
		return out, nil
	case o.Verb == "delete" && !exists:
		return out, nil
	case !exists && o.Verb != "create" && o.Verb != "snapshot" && o.Verb != "clone":
		return nil, fmt.Errorf("%s does not exist", o.Name)
	}
	switch o.Verb {
	case "create":
		if err := needs(o.Size >= pcMinVolBytes, "too small"); err != nil {
			return nil, err
		}
		out[o.Name] = pcVol{Kind: KindVolume, Size: o.Size}
	case "snapshot", "clone":
		src, ok := vols[o.Source]
		if !ok {
			return nil, fmt.Errorf("source %s does not exist", o.Source)
		}
		n := src
		n.Source, n.Active = o.Source, false
		if o.Verb == "snapshot" {
			n.Kind = KindSnapshot
		} else {
			if o.Size < src.Size {
				return nil, fmt.Errorf("clone smaller than its source")
			}
			n.Kind, n.Size = KindVolume, o.Size
		}
		out[o.Name] = n
	case "delete":
		delete(out, o.Name)
	case "activate", "deactivate":
		v.Active = o.Verb == "activate"
		out[o.Name] = v
	case "grow":
		v.Size = max(v.Size, o.Size)
		out[o.Name] = v
	case "write":
		if !v.Active {
			return nil, fmt.Errorf("write to %s, which is not active", o.Name)
		}
		for b := 0; b < pcBlocksPerSlot; b++ {
			if mask&(1<<b) != 0 {
				v.Blocks[o.Slot*pcBlocksPerSlot+b] = o.N
			}
		}
		out[o.Name] = v
	}
	return out, nil
}

// pcProblem is one way the observed state breaks the promise: "lost" (an
// acknowledged thing missing or different) or "leak" (a thing no
// acknowledged operation made).
type pcProblem struct {
	Kind string
	What string
}

func (p pcProblem) String() string { return p.Kind + ": " + p.What }

// pcDiff lists how got differs from want.
func pcDiff(want, got map[string]pcVol) []pcProblem {
	var out []pcProblem
	names := map[string]bool{}
	for n := range want {
		names[n] = true
	}
	for n := range got {
		names[n] = true
	}
	sorted := make([]string, 0, len(names))
	for n := range names {
		sorted = append(sorted, n)
	}
	sort.Strings(sorted)
	for _, n := range sorted {
		w, inWant := want[n]
		g, inGot := got[n]
		switch {
		case !inGot:
			out = append(out, pcProblem{"lost", fmt.Sprintf("%s (%s of %d bytes) is gone", n, w.Kind, w.Size)})
			continue
		case !inWant:
			out = append(out, pcProblem{"leak", fmt.Sprintf("%s (%s of %d bytes from %q) exists, and no acknowledged operation made it", n, g.Kind, g.Size, g.Source)})
			continue
		}
		if w.Kind != g.Kind || w.Source != g.Source || w.Size != g.Size {
			out = append(out, pcProblem{"lost", fmt.Sprintf("%s is a %s of %d bytes from %q, want a %s of %d bytes from %q", n, g.Kind, g.Size, g.Source, w.Kind, w.Size, w.Source)})
		}
		if w.Active != g.Active {
			out = append(out, pcProblem{"lost", fmt.Sprintf("%s active=%v, want %v", n, g.Active, w.Active)})
		}
		for i := range w.Blocks {
			if w.Blocks[i] != g.Blocks[i] {
				out = append(out, pcProblem{"lost", fmt.Sprintf("%s slot %d block %d holds %s, want %s", n, i/pcBlocksPerSlot, i%pcBlocksPerSlot, pcBlockName(g.Blocks[i]), pcBlockName(w.Blocks[i]))})
			}
		}
	}
	return out
}

func pcBlockName(n int) string {
	switch n {
	case 0:
		return "zeros"
	case pcBlockGarbage:
		return "neither zeros nor any write's pattern"
	}
	return fmt.Sprintf("write %d", n)
}

// judge compares the state a boot found with the promise. With nothing
// pending, it must be the promised state; with an operation pending, the
// state before it or after it (a write: each block of its slot old or new).
// It returns the settle line for the pending operation, if any, and the
// problems; a settle line only comes with no problems.
func (m *pcModel) judge(got map[string]pcVol) (settle string, problems []pcProblem) {
	o := m.pending
	if o == nil {
		return "", pcDiff(m.vols, got)
	}
	if o.Verb == "write" {
		var mask uint16
		if g, ok := got[o.Name]; ok {
			for b := 0; b < pcBlocksPerSlot; b++ {
				if g.Blocks[o.Slot*pcBlocksPerSlot+b] == o.N {
					mask |= 1 << b
				}
			}
		}
		after, err := m.apply(*o, m.vols, mask)
		if err != nil {
			return "", []pcProblem{{"lost", fmt.Sprintf("pending %s: %v", o, err)}}
		}
		if problems := pcDiff(after, got); len(problems) > 0 {
			return "", problems
		}
		switch mask {
		case 0:
			return fmt.Sprintf("%ssettle %d undone", pcLinePrefix, o.N), nil
		case 1<<pcBlocksPerSlot - 1:
			return fmt.Sprintf("%ssettle %d done", pcLinePrefix, o.N), nil
		}
		return fmt.Sprintf("%ssettle %d torn %04x", pcLinePrefix, o.N, mask), nil
	}
	before := pcDiff(m.vols, got)
	if len(before) == 0 {
		return fmt.Sprintf("%ssettle %d undone", pcLinePrefix, o.N), nil
	}
	after, err := m.apply(*o, m.vols, 0)
	if err != nil {
		return "", []pcProblem{{"lost", fmt.Sprintf("pending %s: %v", o, err)}}
	}
	afterProblems := pcDiff(after, got)
	if len(afterProblems) == 0 {
		return fmt.Sprintf("%ssettle %d done", pcLinePrefix, o.N), nil
	}
	// Neither: report against the closer of the two.
	problems = before
	if len(afterProblems) < len(before) {
		problems = afterProblems
	}
	for i := range problems {
		problems[i].What += fmt.Sprintf(" (with operation %s pending, neither the state before it nor the one after it)", o)
	}
	return "", problems
}

// liveWrites returns the writes whose pattern the promised state holds.
func (m *pcModel) liveWrites() map[int]bool {
	out := map[int]bool{}
	for _, v := range m.vols {
		for _, n := range v.Blocks {
			if n > 0 {
				out[n] = true
			}
		}
	}
	return out
}

// pcBlock is block blk of slot in write n through volume writer: a header
// that names them, then bytes derived from them.
func pcBlock(writer string, n, slot, blk int) []byte {
	b := make([]byte, pcBlockBytes)
	hdr := fmt.Sprintf("pcw %s op=%d slot=%d blk=%d\n", writer, n, slot, blk)
	copy(b, hdr)
	h := fnv.New64a()
	h.Write([]byte(hdr))
	x := h.Sum64() | 1
	for i := (len(hdr) + 7) &^ 7; i+8 <= len(b); i += 8 {
		x ^= x << 13 // xorshift64
		x ^= x >> 7
		x ^= x << 17
		binary.LittleEndian.PutUint64(b[i:], x)
	}
	return b
}

// pcIdentify names what a block read from slot, block blk holds: 0 for
// zeros, the write's number for an intact pattern of that slot and block
// written through the volume the model says (writers), else
// pcBlockGarbage.
func pcIdentify(b []byte, slot, blk int, writers map[int]string) int {
	if bytes.Equal(b, make([]byte, len(b))) {
		return 0
	}
	var (
		writer           string
		n, gotSlot, gotB int
	)
	line, _, ok := bytes.Cut(b, []byte{'\n'})
	if !ok {
		return pcBlockGarbage
	}
	if _, err := fmt.Sscanf(string(line), "pcw %s op=%d slot=%d blk=%d", &writer, &n, &gotSlot, &gotB); err != nil {
		return pcBlockGarbage
	}
	if n <= 0 || gotSlot != slot || gotB != blk || writers[n] != writer || !bytes.Equal(b, pcBlock(writer, n, slot, blk)) {
		return pcBlockGarbage
	}
	return n
}
