package bench

import "golang.org/x/sys/unix"

func unixSync() { unix.Sync() }
