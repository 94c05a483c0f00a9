package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agent/internal/benchtable"
)

func TestSizesFromEnv(t *testing.T) {
	env := map[string]string{"TAILNET_BENCH_MIB": "64", "COORD_BENCH_AGENTS": "500"}
	s, err := sizesFromEnv(func(k string) string { return env[k] })
	if err != nil || s.tailnetMiB != 64 || s.coordAgents != 500 || s.sshdBytes != 256<<20 {
		t.Fatalf("sizes %+v, %v", s, err)
	}
	for k, v := range map[string]string{"COORD_BENCH_AGENTS": "150", "SSHD_BENCH_BYTES": "lots"} {
		_, err := sizesFromEnv(func(name string) string {
			if name == k {
				return v
			}
			return ""
		})
		if err == nil || !strings.Contains(err.Error(), k) {
			t.Errorf("%s=%s: err %v, want one naming the variable", k, v, err)
		}
	}
}

func TestResultBaseNeverOverwrites(t *testing.T) {
	dir := t.TempDir()
	at := time.Date(2026, 11, 22, 14, 0, 0, 0, time.UTC)
	first, err := resultBase(dir, at, "abc1234", true)
	if err != nil || first != filepath.Join(dir, "2026-11-22-abc1234-dirty") {
		t.Fatalf("first base %q, %v", first, err)
	}
	if err := os.WriteFile(first+".md", nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if second, _ := resultBase(dir, at, "abc1234", true); second != first+"-2" {
		t.Fatalf("second base %q, want %q", second, first+"-2")
	}
}

func TestDeploymentRows(t *testing.T) {
	r := deploymentResult{
		SSHTrueMS:   []float64{300, 120, 150, 900, 140},
		OpenSSHNote: "needs root to run sshd",
		IdleRSSKiB:  30000, IdleHWMKiB: 31000,
		LoadRSSKiB: 60000, LoadHWMKiB: 61000, LoadMBps: 95,
	}
	rows := r.rows()
	if rows[0].Figure.Value != 150 || rows[0].Reference.Value != nil || rows[0].Ratio != nil || !strings.Contains(rows[0].Reference.Note, "needs root") {
		t.Errorf("ssh row: %+v", rows[0])
	}
	if got := rows[1].Figure.Value; got < 30.71 || got > 30.73 || rows[1].Reference.Value.Value != rssTargetMB || rows[1].Status != benchtable.StatusOK {
		t.Errorf("idle RSS row: %+v (want 30000 KiB = 30.72 MB against the target)", rows[1])
	}
	r.OpenSSHTrueMS = []float64{600, 500, 700}
	if rows := r.rows(); rows[0].Reference.Value.Value != 600 || *rows[0].Ratio != 0.25 {
		t.Errorf("ssh row with the reference: %+v", rows[0])
	}
}
