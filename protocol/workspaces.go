package protocol

import "time"

// WorkspacesPath answers, for a user token, the workspaces (agents) that
// user may reach, with what the coordinator knows of each: `agent list`
// and shell completion of workspace names.
const WorkspacesPath = "/api/v1/workspaces"

// WorkspaceInfo is one entry of WorkspacesPath's answer.
type WorkspaceInfo struct {
	Name  string `json:"name"`
	Owner string `json:"owner"`
	// Online: its agent is connected to the coordinator now.
	Online bool `json:"online"`
	// OfflineSince and OfflineReason say since when and how an offline
	// agent left (zero when unknown, e.g. never connected since the
	// coordinator started).
	OfflineSince  time.Time  `json:"offline_since,omitzero"`
	OfflineReason GoneReason `json:"offline_reason,omitempty"`
	// Network is the agent's latest network verdict, if it sent one.
	Network *NetworkVerdict `json:"network,omitempty"`
}

// Workspaces is the JSON answer of WorkspacesPath, sorted by name.
type Workspaces struct {
	Workspaces []WorkspaceInfo `json:"workspaces"`
}
