package main

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/spf13/pflag"
)

const exitCodesHelp = `Exit codes:
  0  success
  1  the daemon answered with an error (or an answer that could not be read)
  2  usage error: unknown command or flag, bad argument
  3  the daemon could not be reached, or did not answer within --timeout
  4  reserve --wait: the reservation failed, expired or was released, or the wait timed out
`

func writeMainHelp(w io.Writer, gfs *pflag.FlagSet) {
	fmt.Fprintf(w, `%[1]s operates nix-builder-autoscaler through the daemon's API.

Usage:
  %[1]s [global flags] <command> [flags] [arguments]

Commands:
`, progName)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, c := range commands {
		fmt.Fprintf(tw, "  %s\t%s\n", c.name, c.summary)
	}
	fmt.Fprintf(tw, "  %s\t%s\n", "help", "show this help, or a command's: help <command>")
	tw.Flush()
	fmt.Fprintf(w, "\nGlobal flags (before or after the command):\n%s\n", gfs.FlagUsages())
	fmt.Fprintf(w, "The daemon is reached over its unix socket unless --url (or NBA_URL) is set;\n"+
		"an explicit --socket wins over NBA_URL.\n\n")
	fmt.Fprint(w, exitCodesHelp)
	fmt.Fprintf(w, "\nRun '%s help <command>' (or '%s <command> --help') for a command's flags.\n", progName, progName)
}

func writeCommandHelp(w io.Writer, c *command, gfs *pflag.FlagSet) {
	synopsis := progName + " " + c.name
	if c.args != "" {
		synopsis += " " + c.args
	}
	fmt.Fprintf(w, "Usage: %s\n\n%s\n", synopsis, c.detail)
	fs := newFlagSet(c.name)
	c.setup(fs)
	if fs.HasFlags() {
		fmt.Fprintf(w, "\nFlags:\n%s", fs.FlagUsages())
	}
	fmt.Fprintf(w, "\nGlobal flags:\n%s\n", gfs.FlagUsages())
	fmt.Fprint(w, exitCodesHelp)
}

// runHelp runs "help [command]".
func runHelp(args []string, gfs *pflag.FlagSet, stdout, stderr io.Writer) int {
	switch len(args) {
	case 0:
		writeMainHelp(stdout, gfs)
		return exitOK
	case 1:
		if args[0] == "help" {
			writeMainHelp(stdout, gfs)
			return exitOK
		}
		c := lookup(args[0])
		if c == nil {
			return fail(stderr, usagef("no help for unknown command %q", args[0]), "")
		}
		writeCommandHelp(stdout, c, gfs)
		return exitOK
	default:
		return fail(stderr, usagef("help takes at most one command, got %q", strings.Join(args, " ")), "")
	}
}
