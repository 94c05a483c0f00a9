// Package deploy holds the deployment files of the agent — Kubernetes
// manifests (kubernetes/), the coordinator's systemd unit and example
// configuration (systemd/) — and the tests that decode them strictly with the
// Kubernetes API types and check them against the agent's real command line.
//
// It is a module of its own so that the Kubernetes API modules, which only
// these tests need, stay out of the agent binary's module graph. Run its
// tests from this directory: `cd deploy && go test ./...`.
package deploy
