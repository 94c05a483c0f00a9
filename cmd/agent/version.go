package main

import (
	"encoding/json"
	"fmt"
	"runtime"
	"runtime/debug"

	"github.com/spf13/cobra"
)

// buildInfo is what `agent version` reports. Everything comes from the
// build information the Go toolchain embeds, so there is no version variable
// to stamp with -ldflags and nothing that can drift from the real build.
type buildInfo struct {
	Version          string `json:"version"`
	Revision         string `json:"revision,omitempty"`
	RevisionTime     string `json:"revision_time,omitempty"`
	Modified         bool   `json:"modified,omitempty"`
	GoVersion        string `json:"go_version"`
	Platform         string `json:"platform"`
	TailscaleVersion string `json:"tailscale_version,omitempty"`
}

// tailscaleModule is the module whose version the engine's behaviour depends
// on; reporting it saves a support round trip.
const tailscaleModule = "tailscale.com"

// readBuildInfo collects the version facts of the running binary.
func readBuildInfo() buildInfo {
	info := buildInfo{
		Version:   "(devel)",
		GoVersion: runtime.Version(),
		Platform:  runtime.GOOS + "/" + runtime.GOARCH,
	}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return info
	}
	if bi.Main.Version != "" {
		info.Version = bi.Main.Version
	}
	if bi.GoVersion != "" {
		info.GoVersion = bi.GoVersion
	}
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			info.Revision = s.Value
		case "vcs.time":
			info.RevisionTime = s.Value
		case "vcs.modified":
			info.Modified = s.Value == "true"
		}
	}
	for _, dep := range bi.Deps {
		if dep.Path != tailscaleModule {
			continue
		}
		info.TailscaleVersion = dep.Version
		if dep.Replace != nil {
			info.TailscaleVersion = dep.Replace.Path + "@" + dep.Replace.Version
		}
	}
	return info
}

// versionOptions is `agent version` as parsed from its command line.
type versionOptions struct {
	json bool
}

func newVersionCmd(env *cliEnv) *cobra.Command {
	return newVersionCmdWith(env, runVersion)
}

// newVersionCmdWith builds the command around runF, so tests can check what
// the command line parses to.
func newVersionCmdWith(env *cliEnv, runF func(*cliEnv, *versionOptions) error) *cobra.Command {
	o := &versionOptions{}
	cmd := &cobra.Command{
		Use:   "version",
		Short: "Print the agent's version, source revision, Go and Tailscale versions",
		Args:  usageArgs(cobra.NoArgs),
		RunE: func(*cobra.Command, []string) error {
			return runF(env, o)
		},
	}
	cmd.Flags().BoolVar(&o.json, "json", false, "print the build information as JSON")
	return cmd
}

// runVersion prints the build information of the running binary.
func runVersion(env *cliEnv, o *versionOptions) error {
	info := readBuildInfo()
	if o.json {
		enc := json.NewEncoder(env.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(info)
	}
	revision := info.Revision
	if revision == "" {
		revision = "unknown (built without VCS information)"
	} else if info.Modified {
		revision += " (modified)"
	}
	fmt.Fprintf(env.Stdout, "agent %s\n", info.Version)
	fmt.Fprintf(env.Stdout, "  revision:  %s\n", revision)
	if info.RevisionTime != "" {
		fmt.Fprintf(env.Stdout, "  committed: %s\n", info.RevisionTime)
	}
	fmt.Fprintf(env.Stdout, "  go:        %s %s\n", info.GoVersion, info.Platform)
	if info.TailscaleVersion != "" {
		fmt.Fprintf(env.Stdout, "  tailscale: %s\n", info.TailscaleVersion)
	}
	return nil
}
