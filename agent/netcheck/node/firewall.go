package node

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/agentd/agent/agent/netcheck"
)

// The firewall check reads the node's nftables ruleset (`nft -j list
// ruleset`; iptables-nft rules are in it too) and runs two packets of each
// pod subnet through it: one leaving (pod → the internet, new) and its
// reply (established). A rule that drops either, or a chain policy of drop
// that nothing accepts them before, breaks every pod on that bridge; so
// does a missing masquerade when the configuration asks for one. Rules with
// matches it does not understand (ports, marks, sets of other kinds) are
// passed over: they cannot apply to all pod traffic.

// nftRuleset is the part of nft's JSON the check reads.
type nftRuleset struct {
	chains map[string]*nftChain // family/table/name
}

type nftChain struct {
	family, table, name string
	typ, hook, policy   string
	rules               []nftRule
}

type nftRule struct {
	handle int
	expr   []map[string]json.RawMessage
}

func parseRuleset(data []byte) (*nftRuleset, error) {
	var doc struct {
		Nftables []map[string]json.RawMessage `json:"nftables"`
	}
	if err := json.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("parsing nft's JSON: %w", err)
	}
	rs := &nftRuleset{chains: map[string]*nftChain{}}
	for _, obj := range doc.Nftables {
		if raw, ok := obj["chain"]; ok {
			var c struct {
				Family, Table, Name, Type, Hook, Policy string
			}
			if err := json.Unmarshal(raw, &c); err != nil {
				return nil, fmt.Errorf("parsing a chain: %w", err)
			}
			rs.chains[c.Family+"/"+c.Table+"/"+c.Name] = &nftChain{family: c.Family, table: c.Table, name: c.Name, typ: c.Type, hook: c.Hook, policy: c.Policy}
		}
		if raw, ok := obj["rule"]; ok {
			var r struct {
				Family, Table, Chain string
				Handle               int
				Expr                 []map[string]json.RawMessage
			}
			if err := json.Unmarshal(raw, &r); err != nil {
				return nil, fmt.Errorf("parsing a rule: %w", err)
			}
			if c := rs.chains[r.Family+"/"+r.Table+"/"+r.Chain]; c != nil {
				c.rules = append(c.rules, nftRule{handle: r.Handle, expr: r.Expr})
			}
		}
	}
	return rs, nil
}

// flow is a packet run through the ruleset.
type flow struct {
	iif, oif     string
	saddr, daddr netip.Addr
	ctState      string
}

// decision is how a chain ended for a flow.
type decision struct {
	verdict string // accept, drop, masquerade, or "" (fell through)
	chain   *nftChain
	rule    *nftRule // nil: the chain's policy
}

// evalChain runs f through c, following jumps and gotos.
func (rs *nftRuleset) evalChain(c *nftChain, f flow, depth int) decision {
	if depth > 16 {
		return decision{}
	}
rules:
	for i := range c.rules {
		r := &c.rules[i]
		for _, e := range r.expr {
			if m, ok := e["match"]; ok {
				// A match that is false, or that this evaluator cannot
				// judge, means the rule is not known to apply.
				if evalMatch(m, f) != yes {
					continue rules
				}
				continue
			}
			switch {
			case has(e, "accept"):
				return decision{"accept", c, r}
			case has(e, "drop"), has(e, "reject"):
				return decision{"drop", c, r}
			case has(e, "masquerade"), has(e, "snat"):
				return decision{"masquerade", c, r}
			case has(e, "return"):
				return decision{}
			case has(e, "jump"), has(e, "goto"):
				var t struct{ Target string }
				raw := e["jump"]
				if raw == nil {
					raw = e["goto"]
				}
				_ = json.Unmarshal(raw, &t)
				if sub := rs.chains[c.family+"/"+c.table+"/"+t.Target]; sub != nil {
					if d := rs.evalChain(sub, f, depth+1); d.verdict != "" {
						return d
					}
				}
				if has(e, "goto") {
					return decision{}
				}
			}
			// counter, log, comment and other statements do not decide.
		}
	}
	return decision{}
}

func has(e map[string]json.RawMessage, k string) bool { _, ok := e[k]; return ok }

type tri int

const (
	unknown tri = iota
	yes
	no
)

// evalMatch evaluates one match against f: yes, no, or unknown for
// matches this evaluator does not model.
func evalMatch(raw json.RawMessage, f flow) tri {
	var m struct {
		Op    string
		Left  map[string]json.RawMessage
		Right json.RawMessage
	}
	if json.Unmarshal(raw, &m) != nil {
		return unknown
	}
	var got func(v any) tri
	if meta, ok := m.Left["meta"]; ok {
		var k struct{ Key string }
		_ = json.Unmarshal(meta, &k)
		var val string
		switch k.Key {
		case "iifname":
			val = f.iif
		case "oifname":
			val = f.oif
		case "nfproto":
			val = "ipv4"
		default:
			return unknown
		}
		got = func(v any) tri {
			s, ok := v.(string)
			if !ok {
				return unknown
			}
			if strings.HasSuffix(s, "*") {
				return boolTri(strings.HasPrefix(val, strings.TrimSuffix(s, "*")))
			}
			return boolTri(s == val)
		}
	} else if pl, ok := m.Left["payload"]; ok {
		var p struct{ Protocol, Field string }
		_ = json.Unmarshal(pl, &p)
		if p.Protocol != "ip" || (p.Field != "saddr" && p.Field != "daddr") {
			return unknown
		}
		a := f.saddr
		if p.Field == "daddr" {
			a = f.daddr
		}
		got = func(v any) tri { return addrMatch(v, a) }
	} else if ct, ok := m.Left["ct"]; ok {
		var k struct{ Key string }
		_ = json.Unmarshal(ct, &k)
		if k.Key != "state" {
			return unknown
		}
		got = func(v any) tri {
			s, ok := v.(string)
			if !ok {
				return unknown
			}
			return boolTri(s == f.ctState)
		}
	} else {
		return unknown
	}
	var right any
	if json.Unmarshal(m.Right, &right) != nil {
		return unknown
	}
	// A list or a set matches if any element does.
	var elems []any
	switch v := right.(type) {
	case []any:
		elems = v
	case map[string]any:
		if s, ok := v["set"].([]any); ok {
			elems = s
		} else {
			elems = []any{v}
		}
	default:
		elems = []any{v}
	}
	res := no
	for _, el := range elems {
		switch got(el) {
		case yes:
			res = yes
		case unknown:
			if res != yes {
				res = unknown
			}
		}
	}
	switch m.Op {
	case "==", "in":
		return res
	case "!=":
		switch res {
		case yes:
			return no
		case no:
			return yes
		}
	}
	return unknown
}

func boolTri(b bool) tri {
	if b {
		return yes
	}
	return no
}

// addrMatch compares an address with an nft value: an address, a prefix
// or a range.
func addrMatch(v any, a netip.Addr) tri {
	switch x := v.(type) {
	case string:
		if p, err := netip.ParsePrefix(x); err == nil {
			return boolTri(p.Contains(a))
		}
		if b, err := netip.ParseAddr(x); err == nil {
			return boolTri(b == a)
		}
	case map[string]any:
		if p, ok := x["prefix"].(map[string]any); ok {
			addr, _ := p["addr"].(string)
			l, _ := p["len"].(float64)
			if b, err := netip.ParseAddr(addr); err == nil {
				return boolTri(netip.PrefixFrom(b, int(l)).Contains(a))
			}
		}
		if r, ok := x["range"].([]any); ok && len(r) == 2 {
			lo, e1 := netip.ParseAddr(fmt.Sprint(r[0]))
			hi, e2 := netip.ParseAddr(fmt.Sprint(r[1]))
			if e1 == nil && e2 == nil {
				return boolTri(lo.Compare(a) <= 0 && a.Compare(hi) <= 0)
			}
		}
	}
	return unknown
}

// baseChains are the IPv4 base chains of a hook and type.
func (rs *nftRuleset) baseChains(hook, typ string) []*nftChain {
	var out []*nftChain
	for _, c := range rs.chains {
		if c.hook == hook && c.typ == typ && (c.family == "ip" || c.family == "inet") {
			out = append(out, c)
		}
	}
	return out
}

// run passes f through every base chain of the hook: each must let it
// through (a drop anywhere is final).
func (rs *nftRuleset) run(hook, typ string, f flow) []decision {
	var out []decision
	for _, c := range rs.baseChains(hook, typ) {
		d := rs.evalChain(c, f, 0)
		if d.verdict == "" {
			d = decision{verdict: c.policy, chain: c}
			if d.verdict == "" {
				d.verdict = "accept"
			}
		}
		out = append(out, d)
	}
	return out
}

func (d decision) where() string {
	s := fmt.Sprintf("%s %s chain %s", d.chain.family, d.chain.table, d.chain.name)
	if d.rule == nil {
		return s + " policy " + d.chain.policy
	}
	return fmt.Sprintf("%s rule handle %d (%s)", s, d.rule.handle, describeRule(d.rule))
}

// describeRule renders a rule roughly as nft prints it, for evidence.
func describeRule(r *nftRule) string {
	var parts []string
	for _, e := range r.expr {
		for k, v := range e {
			if k == "match" {
				var m struct {
					Op    string
					Left  map[string]map[string]any
					Right any
				}
				_ = json.Unmarshal(v, &m)
				left := ""
				for lk, lv := range m.Left {
					switch lk {
					case "meta", "ct":
						left = strings.TrimSpace(fmt.Sprint(lk, " ", lv["key"]))
						if lk == "meta" {
							left = fmt.Sprint(lv["key"])
						}
					case "payload":
						left = fmt.Sprint(lv["protocol"], " ", lv["field"])
					default:
						left = lk
					}
				}
				right, _ := json.Marshal(m.Right)
				op := ""
				if m.Op == "!=" {
					op = "!= "
				}
				parts = append(parts, fmt.Sprintf("%s %s%s", left, op, strings.Trim(string(right), `"`)))
				continue
			}
			if k != "counter" && k != "comment" {
				parts = append(parts, k)
			}
		}
	}
	return strings.Join(parts, " ")
}

// readRuleset runs nft; the reasons it could not are errors a person can act on.
func readRuleset(ctx context.Context) ([]byte, error) {
	path, err := exec.LookPath("nft")
	if err != nil {
		return nil, errors.New("the nft program is not in this image, so the node's firewall (FORWARD and NAT rules) was not checked; run `agent netcheck --host` on the node itself, or use an image with nftables")
	}
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, path, "-j", "list", "ruleset")
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		msg := strings.TrimSpace(stderr.String())
		if strings.Contains(msg, "ermission") || strings.Contains(msg, "not permitted") {
			return nil, fmt.Errorf("reading the firewall needs CAP_NET_ADMIN (nft: %s), so FORWARD and NAT rules were not checked; grant the capability to the netcheck DaemonSet or run as root on the node", msg)
		}
		return nil, fmt.Errorf("nft -j list ruleset: %v: %s", err, msg)
	}
	return out, nil
}

// legacyTables lists legacy (non-nft) iptables tables, which nft cannot show.
func legacyTables() []string {
	b, err := os.ReadFile("/proc/net/ip_tables_names")
	if err != nil {
		return nil
	}
	return strings.Fields(string(b))
}

// outside is the address the check sends the pods' traffic to: any
// address beyond the node will do (TEST-NET-2).
var outside = netip.MustParseAddr("198.51.100.7")

func firewallCheck(ctx context.Context, inv *inventory) *netcheck.CheckBuilder {
	c := netcheck.NewCheck("firewall", "The node's firewall passes and masquerades pod traffic")
	nets := podNets(inv)
	if len(nets) == 0 {
		c.Skip("no addressed container bridge to check the firewall for")
		return c.Done()
	}
	uplink := ""
	if d := inv.st.DefaultRoutes(); len(d) > 0 {
		uplink = linkName(inv.st, d[0].LinkIndex)
	}
	data, err := readRuleset(ctx)
	if err != nil {
		c.Skip(err.Error())
		return c.Done()
	}
	rs, err := parseRuleset(data)
	if err != nil {
		c.Fail(netcheck.StatusDegraded, "firewall.unparsable", fmt.Sprintf("cannot understand the node's nftables ruleset: %v", err), nil,
			netcheck.Remedy{Text: "inspect it by hand: nft list ruleset", Commands: []string{"nft list ruleset"}})
		return c.Done()
	}
	if lt := legacyTables(); len(lt) > 0 {
		c.Detail("legacy_iptables_not_checked", lt)
	}
	for _, n := range nets {
		br := n.bridge.Attrs().Name
		pod := n.podAddr()
		out := flow{iif: br, oif: uplink, saddr: pod, daddr: outside, ctState: "new"}
		back := flow{iif: uplink, oif: br, saddr: outside, daddr: pod, ctState: "established"}
		for _, dir := range []struct {
			what string
			f    flow
		}{{fmt.Sprintf("%s → %s (pod → beyond the node, new)", pod, outside), out}, {fmt.Sprintf("%s → %s (the reply, established)", outside, pod), back}} {
			for _, d := range rs.run("forward", "filter", dir.f) {
				if d.verdict != "drop" {
					continue
				}
				ev := []string{fmt.Sprintf("%s: dropped by %s", dir.what, d.where())}
				if d.rule != nil {
					c.Fail(netcheck.StatusBroken, "firewall.forward_drop", fmt.Sprintf("a firewall rule drops traffic of the pods on %s (%s) that the node forwards", br, n.subnet), ev,
						netcheck.Remedy{Text: "delete the rule (and find what installed it)",
							Commands: []string{fmt.Sprintf("nft delete rule %s %s %s handle %d", d.chain.family, d.chain.table, d.chain.name, d.rule.handle)}})
					continue
				}
				c.Fail(netcheck.StatusBroken, "firewall.forward_policy", fmt.Sprintf("the forward chain %s %s %s drops by policy, and no rule accepts the traffic of the pods on %s (%s)", d.chain.family, d.chain.table, d.chain.name, br, n.subnet), ev,
					netcheck.Remedy{Text: "accept the bridge's traffic in that chain (the CNI's firewall plugin or Docker normally adds these)",
						Commands: []string{
							fmt.Sprintf("nft insert rule %s %s %s oifname %q ct state established,related accept", d.chain.family, d.chain.table, d.chain.name, br),
							fmt.Sprintf("nft insert rule %s %s %s iifname %q accept", d.chain.family, d.chain.table, d.chain.name, br),
						}})
			}
		}
		if n.masq {
			masq := false
			for _, d := range rs.run("postrouting", "nat", out) {
				if d.verdict == "masquerade" {
					masq = true
				}
			}
			if !masq {
				c.Fail(netcheck.StatusBroken, "firewall.no_masquerade", fmt.Sprintf("nothing masquerades the pod subnet %s: pod traffic leaves the node with pod addresses and the replies never come back", n.subnet),
					[]string{fmt.Sprintf("%s asks for masquerade (ipMasq)", n.source), fmt.Sprintf("no nat postrouting rule masquerades %s → %s out of %s", pod, outside, uplink)},
					netcheck.Remedy{Text: "masquerade the subnet (the bridge plugin's ipMasq rule is missing; restarting the pods re-adds it)",
						Commands: []string{
							"nft add table ip agent_netcheck_nat",
							"nft add chain ip agent_netcheck_nat postrouting '{ type nat hook postrouting priority srcnat; policy accept; }'",
							fmt.Sprintf("nft add rule ip agent_netcheck_nat postrouting ip saddr %s oifname != %q masquerade", n.subnet, br),
						}})
			}
		}
	}
	if c.Status == netcheck.StatusOK {
		c.Summary = fmt.Sprintf("pod traffic of %d subnet(s) passes the forward chains and is masqueraded where asked", len(nets))
	} else {
		c.Summary = fmt.Sprintf("%d firewall problem(s) for pod traffic", len(c.Findings))
	}
	return c.Done()
}
