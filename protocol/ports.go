package protocol

// Tailnet ports the agent serves itself. Ports 1 to ReservedPorts belong to
// the agent; every other port leads to the workspace's localhost (a dev
// server bound to 127.0.0.1 is reachable), and is never reserved later.
const (
	// PortSSH is the agent's SSH server.
	PortSSH = 1
	// PortAPI is the agent's HTTP API (/api/v1/status, /api/v1/ports).
	PortAPI = 2
	// PortSpeedtest is the throughput test of `agent speedtest`.
	PortSpeedtest = 3
	// ReservedPorts is the highest port that belongs to the agent.
	ReservedPorts = 9
)

// ListeningPort is one TCP port that accepts connections in the workspace,
// as the agent API's /api/v1/ports lists it.
type ListeningPort struct {
	Port uint16 `json:"port"`
	// Network is "tcp".
	Network string `json:"network"`
	// Addresses are the local addresses the port is bound to, such as
	// "127.0.0.1", "0.0.0.0" or "::".
	Addresses []string `json:"addresses"`
	// Process is the command name of the owning process, when the agent may
	// read it.
	Process string `json:"process,omitempty"`
	PID     int    `json:"pid,omitempty"`
}
