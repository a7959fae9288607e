// Command beacon runs the beacon server and talks to it from the shell.
package main

import (
	"os"

	"beacon.dev/beacon/cmd/beacon/internal/cli"
)

func main() { os.Exit(cli.Main(os.Args[1:], os.Stdout, os.Stderr)) }
