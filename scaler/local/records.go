package local

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"time"
)

var idPattern = regexp.MustCompile(`^local-[0-9a-f]{16}$`)

// record is the on-disk form of an instance: its tags and what is known of
// its process.
type record struct {
	ID         string    `json:"id"`
	Cluster    string    `json:"cluster"`
	Pool       string    `json:"pool"`
	Slot       string    `json:"slot"`
	LaunchID   string    `json:"launch_id"`
	LaunchedAt time.Time `json:"launched_at"`
	Type       string    `json:"type"`
	Market     string    `json:"market"`
	Mode       string    `json:"mode"`             // "standin" or "hook"
	Marker     string    `json:"marker,omitempty"` // in the stand-in's cmdline
	PID        int       `json:"pid,omitempty"`
	// HookPID is the launch command's process (and group) id while it runs,
	// so a launch cut off by a daemon crash can be stopped by Terminate.
	HookPID      int       `json:"hook_pid,omitempty"`
	Address      string    `json:"address,omitempty"`
	TerminatedAt time.Time `json:"terminated_at,omitzero"`
	StateReason  string    `json:"state_reason,omitempty"`
}

func (r record) terminated() bool { return !r.TerminatedAt.IsZero() }

func (p *Provider) recordPath(id string) string { return filepath.Join(p.dir, id+".json") }
func (p *Provider) addrPath(id string) string   { return filepath.Join(p.dir, id+".addr") }
func (p *Provider) logPath(id string) string    { return filepath.Join(p.dir, id+".log") }

// cachedRecord is a record as read from a file with this identity: a
// record is replaced by rename (writeFileAtomic), which gives it a new
// inode, and any other edit changes its size or mtime.
type cachedRecord struct {
	rec   record
	ino   uint64
	size  int64
	mtime time.Time
}

// readRecord reads instance id's record. A file unchanged since it was last
// read (same inode, size and mtime: one lstat) is not read and decoded
// again: List reads every record every round, and with a hundred builders
// that was most of a round's time.
func (p *Provider) readRecord(id string) (record, error) {
	path := p.recordPath(id)
	fi, err := os.Lstat(path)
	if err != nil {
		p.forget(id)
		return record{}, err
	}
	var ino uint64
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		ino = st.Ino
	}
	p.cacheMu.Lock()
	c, ok := p.cache[id]
	p.cacheMu.Unlock()
	if ok && ino != 0 && c.ino == ino && c.size == fi.Size() && c.mtime.Equal(fi.ModTime()) {
		return c.rec, nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return record{}, err
	}
	var r record
	if err := json.Unmarshal(b, &r); err != nil {
		return record{}, fmt.Errorf("record %s: %w", id, err)
	}
	if r.ID != id {
		return record{}, fmt.Errorf("record %s: holds id %q", id, r.ID)
	}
	p.cacheMu.Lock()
	if p.cache == nil {
		p.cache = map[string]cachedRecord{}
	}
	p.cache[id] = cachedRecord{rec: r, ino: ino, size: fi.Size(), mtime: fi.ModTime()}
	p.cacheMu.Unlock()
	return r, nil
}

// forget drops the cached record of id.
func (p *Provider) forget(id string) {
	p.cacheMu.Lock()
	delete(p.cache, id)
	p.cacheMu.Unlock()
}

func (p *Provider) writeRecord(r record) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	p.forget(r.ID)
	return writeFileAtomic(p.recordPath(r.ID), append(b, '\n'), 0o640)
}

func (p *Provider) deleteRecord(id string) {
	p.forget(id)
	for _, path := range []string{p.addrPath(id), p.logPath(id), p.recordPath(id)} {
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			p.log.Warn("local provider: cannot delete", "file", path, "err", err)
		}
	}
}

// removeStaleTemp deletes a temporary file left by a crash during an
// atomic write.
func (p *Provider) removeStaleTemp(name string, now time.Time) {
	if !strings.HasSuffix(name, ".tmp") {
		return
	}
	path := filepath.Join(p.dir, name)
	if fi, err := os.Stat(path); err == nil && now.Sub(fi.ModTime()) > recordRetention {
		_ = os.Remove(path)
	}
}

// writeFileAtomic writes data to path through a temporary file in the same
// directory: write, fsync, rename, fsync the directory. Readers see the old
// content or the new, never a part.
func writeFileAtomic(path string, data []byte, perm os.FileMode) error {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, "."+base+".*.tmp")
	if err != nil {
		return err
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			_ = f.Close()
			_ = os.Remove(tmp)
		}
	}()
	if _, err := f.Write(data); err != nil {
		return err
	}
	if err := f.Chmod(perm); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	ok = true
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// instanceLock serialises Launch and Terminate of one instance. It is a
// channel so a waiter can give up when its context ends.
type instanceLock struct {
	ch   chan struct{}
	refs int
}

func (p *Provider) lockInstance(ctx context.Context, id string) (unlock func(), err error) {
	p.mu.Lock()
	l := p.locks[id]
	if l == nil {
		l = &instanceLock{ch: make(chan struct{}, 1)}
		p.locks[id] = l
	}
	l.refs++
	p.mu.Unlock()
	release := func() {
		p.mu.Lock()
		l.refs--
		if l.refs == 0 {
			delete(p.locks, id)
		}
		p.mu.Unlock()
	}
	select {
	case l.ch <- struct{}{}:
		return func() { <-l.ch; release() }, nil
	case <-ctx.Done():
		release()
		return nil, ctx.Err()
	}
}
