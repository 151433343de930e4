package executor

import (
	"sync"
	"unicode/utf8"
)

// cappedBuffer keeps the first max bytes written to it and counts, then
// drops, the rest. Writes never fail, so a producer is always drained and
// memory stays bounded however much it writes. It is safe for concurrent use
// (the reader goroutine writes while the execution may already be reporting).
type cappedBuffer struct {
	mu        sync.Mutex
	max       int
	buf       []byte
	truncated bool
}

func newCappedBuffer(max int) *cappedBuffer {
	return &cappedBuffer{max: max}
}

// Write keeps what fits under the cap and reports all of p as written.
func (b *cappedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	keep := min(max(b.max-len(b.buf), 0), len(p))
	b.buf = append(b.buf, p[:keep]...)
	if keep < len(p) {
		b.truncated = true
	}
	return len(p), nil
}

// Result returns the kept bytes as a string and whether anything was
// dropped. When truncated, a multi-byte UTF-8 sequence cut by the cap is
// trimmed so the text stays valid.
func (b *cappedBuffer) Result() (string, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := b.buf
	if b.truncated {
		out = trimPartialRune(out)
	}
	return string(out), b.truncated
}

// trimPartialRune drops an incomplete UTF-8 sequence at the end of p.
func trimPartialRune(p []byte) []byte {
	// A rune is at most 4 bytes: look back at most 3 for its start.
	for i := 1; i <= utf8.UTFMax-1 && i <= len(p); i++ {
		c := p[len(p)-i]
		if utf8.RuneStart(c) {
			if !utf8.FullRune(p[len(p)-i:]) {
				return p[:len(p)-i]
			}
			return p
		}
	}
	return p
}
