package config

import (
	"fmt"
	"io"
	"os"
	"strings"
	"unicode/utf8"

	"github.com/BurntSushi/toml"
)

// Limits on what a config file may hold before any of it is parsed. The
// file is written by an operator, but the daemon and check-config read it
// on a shared host too: whatever is in it must cost bounded memory and time.
const (
	// MaxFileSize is the largest config file read. The full example in
	// docs/configuration.md is a few KiB.
	MaxFileSize = 1 << 20
	// MaxSecretFileSize is the largest secret file the daemon reads
	// (daemon.token_file, tailscale.api_key_file): a token is tens of bytes.
	MaxSecretFileSize = 64 << 10
	// MaxNesting is how deep tables, inline tables, arrays and dotted keys
	// may nest. The deepest real key is pool[i].ec2.instance_types[j]. The
	// TOML decoder's work grows with the square of the depth (it copies the
	// key path at every level): 8,000 nested inline tables cost it gigabytes.
	MaxNesting = 32
	// maxShown is how much of a value from the file an error repeats.
	maxShown = 64
	// maxMessage bounds a message quoting text that is not a single value
	// (a template or TOML syntax error).
	maxMessage = 256
)

// FileTooLargeError is a file larger than the limit that applies to it.
type FileTooLargeError struct {
	Path  string
	What  string // "config file", "token_file"
	Limit int64
}

func (e *FileTooLargeError) Error() string {
	return fmt.Sprintf("%s %s is larger than %s, the most a %s may be; check that the path names the right file",
		e.What, e.Path, sizeString(e.Limit), e.What)
}

// NestingError is a file whose tables, arrays or dotted keys nest deeper
// than MaxNesting.
type NestingError struct {
	Line  int
	Limit int
}

func (e *NestingError) Error() string {
	return fmt.Sprintf("config syntax: line %d: tables, arrays and dotted keys nest deeper than %d levels; no valid config nests more than a few",
		e.Line, e.Limit)
}

// SyntaxError is a TOML syntax error. It unwraps to the decoder's
// toml.ParseError (which has the line); its message repeats at most a
// short prefix of the text it quotes.
type SyntaxError struct {
	Err toml.ParseError
}

func (e *SyntaxError) Error() string {
	pe := e.Err
	if pe.LastKey == "" {
		return fmt.Sprintf("config syntax: toml: line %d: %s", pe.Position.Line, clip(pe.Message, maxMessage))
	}
	return fmt.Sprintf("config syntax: toml: line %d (last key %q): %s", pe.Position.Line, Clip(pe.LastKey), clip(pe.Message, maxMessage))
}

func (e *SyntaxError) Unwrap() error { return e.Err }

func sizeString(n int64) string {
	switch {
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%d KiB", n>>10)
	}
	return fmt.Sprintf("%d bytes", n)
}

// readLimited reads the file at path, failing with a FileTooLargeError
// when it holds more than limit bytes. It reads at most limit+1 bytes,
// whatever the file is (/dev/zero, a FIFO fed forever).
func readLimited(path, what string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(data)) > limit {
		return nil, &FileTooLargeError{Path: path, What: what, Limit: limit}
	}
	return data, nil
}

// ReadSecretFile reads a secret file named in the config (what is its key,
// like "token_file"), at most MaxSecretFileSize bytes.
func ReadSecretFile(path, what string) ([]byte, error) {
	return readLimited(path, what, MaxSecretFileSize)
}

// Clip shortens text from the config file that an error repeats: its first
// 64 bytes (cut at a character boundary) and its full length.
func Clip(s string) string { return clip(s, maxShown) }

func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	cut := n
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return fmt.Sprintf("%s…(%d bytes)", s[:cut], len(s))
}

// clipArgs clips every string among a message's arguments, and every value
// that formats as one (Duration and Timeout keep the text as written).
func clipArgs(args []any) []any {
	out := make([]any, len(args))
	for i, a := range args {
		switch a := a.(type) {
		case string:
			out[i] = Clip(a)
		case fmt.Stringer:
			out[i] = Clip(a.String())
		default:
			out[i] = a
		}
	}
	return out
}

// checkNesting scans TOML text for nesting deeper than MaxNesting before
// the decoder sees it. It follows just enough of the grammar to tell keys
// from values: strings (basic, literal, multi-line) and comments are
// skipped; a key's dots, a [table] header's dots and every open '{' or '['
// of a value count as one level each. Where the text is not valid TOML the
// count may be off, but the decoder stops at the first such place too.
func checkNesting(data []byte) error {
	s := nestScanner{data: data, line: 1, keyMode: true, lineStart: true}
	return s.run()
}

type nestScanner struct {
	data []byte
	i    int
	line int
	// stack holds each open container of a value: '{' (an inline table,
	// whose entries start with a key) or '[' (an array).
	stack []byte
	// depths is the nesting at each open container, which the dots of a
	// key inside it add to.
	depths    []int
	keyMode   bool // reading a key: dots nest
	keyDots   int
	lineStart bool
}

func (s *nestScanner) depth() int {
	if len(s.depths) == 0 {
		return 0
	}
	return s.depths[len(s.depths)-1]
}

func (s *nestScanner) check(d int) error {
	if d > MaxNesting {
		return &NestingError{Line: s.line, Limit: MaxNesting}
	}
	return nil
}

func (s *nestScanner) push(c byte) error {
	d := s.depth() + s.keyDots + 1
	s.stack = append(s.stack, c)
	s.depths = append(s.depths, d)
	s.keyDots = 0
	s.keyMode = c == '{'
	return s.check(d)
}

func (s *nestScanner) pop() {
	if len(s.stack) > 0 {
		s.stack = s.stack[:len(s.stack)-1]
		s.depths = s.depths[:len(s.depths)-1]
	}
	s.keyMode, s.keyDots = false, 0
}

func (s *nestScanner) run() error {
	for s.i < len(s.data) {
		c := s.data[s.i]
		if s.lineStart && len(s.stack) == 0 && c != ' ' && c != '\t' && c != '\r' && c != '\n' {
			s.lineStart = false
			s.keyMode, s.keyDots = true, 0
			if c == '[' {
				// A [table] or [[array]] header: its dots nest like a key's.
				s.i++
				if err := s.header(); err != nil {
					return err
				}
				continue
			}
		}
		if err := s.step(c); err != nil {
			return err
		}
	}
	return nil
}

// header reads a table header up to its closing bracket.
func (s *nestScanner) header() error {
	dots := 1
	for s.i < len(s.data) {
		c := s.data[s.i]
		switch c {
		case '"', '\'':
			s.skipString()
			continue
		case '.':
			dots++
			if err := s.check(dots); err != nil {
				return err
			}
		case '\n', ']':
			// The rest of the line is values or a comment; the next line
			// starts afresh.
			s.keyMode = false
			return nil
		}
		s.i++
	}
	return nil
}

func (s *nestScanner) step(c byte) error {
	switch c {
	case '"', '\'':
		s.skipString()
		return nil
	case '#':
		for s.i < len(s.data) && s.data[s.i] != '\n' {
			s.i++
		}
		return nil
	case '\n':
		s.line++
		if len(s.stack) == 0 {
			s.lineStart = true
		}
	case '.':
		if s.keyMode {
			s.keyDots++
			if err := s.check(s.depth() + s.keyDots + 1); err != nil {
				return err
			}
		}
	case '=':
		if s.keyMode {
			s.keyMode = false
		}
	case ',':
		if n := len(s.stack); n > 0 && s.stack[n-1] == '{' {
			s.keyMode, s.keyDots = true, 0
		}
	case '{', '[':
		if !s.keyMode {
			s.i++
			return s.push(c)
		}
	case '}', ']':
		s.pop()
	}
	s.i++
	return nil
}

// skipString moves past the string starting at s.i: "…", '…', """…""" or
// ”'…”', counting the lines it spans.
func (s *nestScanner) skipString() {
	q := s.data[s.i]
	triple := strings.HasPrefix(string(s.data[s.i:min(s.i+3, len(s.data))]), string([]byte{q, q, q}))
	if triple {
		s.i += 3
	} else {
		s.i++
	}
	for s.i < len(s.data) {
		c := s.data[s.i]
		switch {
		case c == '\\' && q == '"':
			s.i += 2
			continue
		case c == '\n':
			if !triple {
				// An unterminated one-line string: the decoder reports it;
				// the newline is left for the caller to count.
				return
			}
			s.line++
		case c == q && !triple:
			s.i++
			return
		case c == q && s.i+2 < len(s.data) && s.data[s.i+1] == q && s.data[s.i+2] == q:
			s.i += 3
			// A closing """ may be followed by up to two more quotes that
			// belong to the string.
			for k := 0; k < 2 && s.i < len(s.data) && s.data[s.i] == q; k++ {
				s.i++
			}
			return
		}
		s.i++
	}
}
