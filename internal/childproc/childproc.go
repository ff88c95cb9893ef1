//go:build linux

// Package childproc starts child processes that the kernel kills when
// this process dies, however it dies (SIGKILL, a crash, an OOM kill): the
// demo's HAProxy and stand-in builders must not outlive it.
//
// Linux delivers the parent-death signal (PR_SET_PDEATHSIG, Go's
// SysProcAttr.Pdeathsig) when the thread that forked the child exits, not
// when the process does. The Go runtime ends a thread when a goroutine
// locked to it returns without unlocking, and a child started from an
// ordinary goroutine may have been forked on such a thread; the child would
// then be killed while this process still runs. So every child is started
// from one goroutine that locks its thread and never returns: that thread
// lives exactly as long as the process.
package childproc

import (
	"os/exec"
	"runtime"
	"sync"
	"syscall"
)

type request struct {
	cmd  *exec.Cmd
	done chan error
}

var (
	once     sync.Once
	requests chan request
)

func spawner() {
	runtime.LockOSThread()
	// Never unlocked, and the loop never ends: the thread must not exit.
	for r := range requests {
		r.done <- r.cmd.Start()
	}
}

// Start starts cmd like cmd.Start, with SIGKILL as its parent-death signal
// (added to cmd.SysProcAttr, whose other settings are kept). The forking
// thread is the spawner's, which lives as long as the process. Go's child
// side checks after setting the signal whether the parent already died, so
// a death during the start is not missed either.
func Start(cmd *exec.Cmd) error {
	once.Do(func() {
		requests = make(chan request)
		go spawner()
	})
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	done := make(chan error, 1)
	requests <- request{cmd: cmd, done: done}
	return <-done
}
