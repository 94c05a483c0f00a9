package main

import "golang.org/x/sys/unix"

// setParentDeathSignal asks the kernel for SIGTERM when the parent exits.
func setParentDeathSignal() {
	_ = unix.Prctl(unix.PR_SET_PDEATHSIG, uintptr(unix.SIGTERM), 0, 0, 0)
}
