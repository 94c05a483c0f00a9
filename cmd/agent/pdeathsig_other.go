//go:build !linux

package main

// setParentDeathSignal: only Linux has PR_SET_PDEATHSIG; watchParent's
// poll covers the other systems.
func setParentDeathSignal() {}
