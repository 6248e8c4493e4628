package devmapper

import "testing"

// BenchmarkParse times the parsers every status read, table load and
// message goes through, one sub-benchmark each. The lines are ones the
// kernel printed in the VM (status_test.go, table_test.go).
func BenchmarkParse(b *testing.B) {
	for _, bc := range []struct {
		name  string
		parse func() error
	}{
		{"ThinPoolStatus", func() error {
			_, err := ParseThinPoolStatus("0 420/4096 30/1024 25 rw no_discard_passdown error_if_no_space - 1024 ")
			return err
		}},
		{"ThinStatus", func() error { _, err := ParseThinStatus("2048 2097151"); return err }},
		{"ThinPoolTarget", func() error {
			_, err := ParseTarget("0 2097152 thin-pool 254:1 254:2 128 1024 2 skip_block_zeroing error_if_no_space")
			return err
		}},
		{"Message", func() error { _, err := ParseMessage("create_snap 17 3"); return err }},
		{"Dev", func() error { _, err := ParseDev("254:17"); return err }},
	} {
		b.Run(bc.name, func(b *testing.B) {
			for b.Loop() {
				if err := bc.parse(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
