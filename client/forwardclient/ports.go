package forwardclient

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/agentd/agent/protocol"
)

// PortsPath is where the agent's API lists the workspace's listening ports.
const PortsPath = "/api/v1/ports"

// ListPorts asks the agent API at baseURL (for example "http://agent/") for
// the TCP ports listening in the workspace.
func ListPorts(ctx context.Context, hc *http.Client, baseURL string) ([]protocol.ListeningPort, error) {
	url := strings.TrimSuffix(baseURL, "/") + PortsPath
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, fmt.Errorf("building the ports request: %w", err)
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("asking the agent for listening ports: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return nil, fmt.Errorf("the agent could not list ports: %s: %s", resp.Status, strings.TrimSpace(string(msg)))
	}
	var ports []protocol.ListeningPort
	if err := json.NewDecoder(io.LimitReader(resp.Body, 8<<20)).Decode(&ports); err != nil {
		return nil, fmt.Errorf("reading the agent's port list: %w", err)
	}
	return ports, nil
}

// WritePortsTable prints ports as an aligned table with a heading.
func WritePortsTable(w io.Writer, ports []protocol.ListeningPort) error {
	if len(ports) == 0 {
		_, err := fmt.Fprintln(w, "No TCP ports are listening in the workspace.")
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "PORT\tADDRESS\tPROCESS")
	for _, p := range ports {
		proc := p.Process
		if proc == "" {
			proc = "-"
		} else if p.PID != 0 {
			proc += " (" + strconv.Itoa(p.PID) + ")"
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\n", p.Port, strings.Join(p.Addresses, ","), proc)
	}
	return tw.Flush()
}
