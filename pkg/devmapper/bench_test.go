package devmapper

import "testing"

// The parsers every status read, table load and message goes through. The
// lines are ones the kernel printed in the VM (status_test.go, table_test.go).

func BenchmarkParseThinPoolStatus(b *testing.B) {
	const line = "0 420/4096 30/1024 25 rw no_discard_passdown error_if_no_space - 1024 "
	for b.Loop() {
		if _, err := ParseThinPoolStatus(line); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkParseThinStatus(b *testing.B) {
	const line = "2048 2097151"
	for b.Loop() {
		if _, err := ParseThinStatus(line); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkParseThinPoolTarget(b *testing.B) {
	const line = "0 2097152 thin-pool 254:1 254:2 128 1024 2 skip_block_zeroing error_if_no_space"
	for b.Loop() {
		if _, err := ParseTarget(line); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkParseMessage(b *testing.B) {
	const line = "create_snap 17 3"
	for b.Loop() {
		if _, err := ParseMessage(line); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkParseDev(b *testing.B) {
	for b.Loop() {
		if _, err := ParseDev("254:17"); err != nil {
			b.Fatal(err)
		}
	}
}
