package executor

import (
	"strings"
	"testing"
)

func TestCappedBuffer(t *testing.T) {
	cases := []struct {
		name      string
		max       int
		writes    []string
		want      string
		truncated bool
	}{
		{name: "empty", max: 4, want: ""},
		{name: "under the cap", max: 10, writes: []string{"abc", "def"}, want: "abcdef"},
		{name: "exactly the cap", max: 6, writes: []string{"abc", "def"}, want: "abcdef"},
		{name: "over the cap in one write", max: 4, writes: []string{"abcdef"}, want: "abcd", truncated: true},
		{name: "over the cap across writes", max: 4, writes: []string{"abc", "def", "ghi"}, want: "abcd", truncated: true},
		{name: "cut rune is trimmed", max: 4, writes: []string{"abc€"}, want: "abc", truncated: true},
		{name: "whole rune at the cap is kept", max: 6, writes: []string{"abc€x"}, want: "abc€", truncated: true},
		{name: "zero cap", max: 0, writes: []string{"a"}, want: "", truncated: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			b := newCappedBuffer(tc.max)
			for _, w := range tc.writes {
				n, err := b.Write([]byte(w))
				if n != len(w) || err != nil {
					t.Fatalf("Write(%q) = %d, %v; want %d, nil", w, n, err, len(w))
				}
			}
			got, truncated := b.Result()
			if got != tc.want || truncated != tc.truncated {
				t.Errorf("Result() = %q, %v; want %q, %v", got, truncated, tc.want, tc.truncated)
			}
		})
	}
}

func TestCappedBufferStaysBounded(t *testing.T) {
	b := newCappedBuffer(1 << 10)
	chunk := []byte(strings.Repeat("z", 64<<10))
	for range 256 { // 16 MiB written
		b.Write(chunk)
	}
	if got, truncated := b.Result(); len(got) != 1<<10 || !truncated {
		t.Fatalf("kept %d bytes, truncated %v", len(got), truncated)
	}
	if c := cap(b.buf); c > 4<<10 {
		t.Errorf("buffer capacity grew to %d bytes", c)
	}
}
