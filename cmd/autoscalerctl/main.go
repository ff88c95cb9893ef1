// Command autoscalerctl is the operator's command-line tool for
// nix-builder-autoscaler. It talks to the daemon only through its HTTP API
// (internal/api), over the daemon's unix socket or its TCP listener.
//
// Run "autoscalerctl help" for the commands, flags and exit codes; the same
// text is in docs/cli.md.
package main

import "os"

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}
