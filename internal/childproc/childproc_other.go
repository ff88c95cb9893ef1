//go:build !linux

package childproc

import "os/exec"

// Start is cmd.Start: only Linux has a parent-death signal.
func Start(cmd *exec.Cmd) error { return cmd.Start() }
