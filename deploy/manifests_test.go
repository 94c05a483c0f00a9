package deploy

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"
)

// object is one decoded manifest document.
type object struct {
	file string
	kind string
	meta metav1.ObjectMeta
	obj  any
}

func (o object) String() string {
	return fmt.Sprintf("%s %s/%s (%s)", o.kind, o.meta.Namespace, o.meta.Name, o.file)
}

// newTyped returns an empty typed object for a manifest's apiVersion and kind.
// Every kind the manifests may use is listed: anything else is an error.
func newTyped(apiVersion, kind string) (any, error) {
	switch apiVersion + " " + kind {
	case "v1 Namespace":
		return &corev1.Namespace{}, nil
	case "v1 Service":
		return &corev1.Service{}, nil
	case "v1 PersistentVolumeClaim":
		return &corev1.PersistentVolumeClaim{}, nil
	case "v1 ConfigMap":
		return &corev1.ConfigMap{}, nil
	case "apps/v1 Deployment":
		return &appsv1.Deployment{}, nil
	case "apps/v1 DaemonSet":
		return &appsv1.DaemonSet{}, nil
	case "monitoring.coreos.com/v1 PrometheusRule":
		return &prometheusRule{}, nil
	case "policy/v1 PodDisruptionBudget":
		return &policyv1.PodDisruptionBudget{}, nil
	}
	return nil, fmt.Errorf("apiVersion %q kind %q is not one the tests know; add it to newTyped", apiVersion, kind)
}

// prometheusRule is the Prometheus Operator's PrometheusRule, as far as
// the manifests use it (the operator's Go types are not worth the module).
type prometheusRule struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		Groups []struct {
			Name  string `json:"name"`
			Rules []struct {
				Alert       string            `json:"alert"`
				Expr        string            `json:"expr"`
				For         string            `json:"for,omitempty"`
				Labels      map[string]string `json:"labels,omitempty"`
				Annotations map[string]string `json:"annotations,omitempty"`
			} `json:"rules"`
		} `json:"groups"`
	} `json:"spec"`
}

var docSeparator = regexp.MustCompile(`(?m)^---[ \t]*$`)

// loadManifests strictly decodes every document of every file in
// kubernetes/: unknown or duplicate fields fail, as `kubectl apply
// --validate=strict` would.
func loadManifests(t *testing.T) []object {
	t.Helper()
	files, err := filepath.Glob(filepath.Join("kubernetes", "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests in kubernetes/ (%v)", err)
	}
	var objs []object
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for i, doc := range docSeparator.Split(string(data), -1) {
			if strings.TrimSpace(stripComments(doc)) == "" {
				continue
			}
			var tm metav1.TypeMeta
			if err := yaml.Unmarshal([]byte(doc), &tm); err != nil {
				t.Fatalf("%s document %d: %v", f, i+1, err)
			}
			typed, err := newTyped(tm.APIVersion, tm.Kind)
			if err != nil {
				t.Fatalf("%s document %d: %v", f, i+1, err)
			}
			if err := yaml.UnmarshalStrict([]byte(doc), typed); err != nil {
				t.Fatalf("%s document %d (%s): strict decoding: %v", f, i+1, tm.Kind, err)
			}
			var meta struct {
				Metadata metav1.ObjectMeta `json:"metadata"`
			}
			if err := yaml.Unmarshal([]byte(doc), &meta); err != nil {
				t.Fatal(err)
			}
			if meta.Metadata.Name == "" {
				t.Errorf("%s document %d (%s) has no metadata.name", f, i+1, tm.Kind)
			}
			objs = append(objs, object{file: filepath.Base(f), kind: tm.Kind, meta: meta.Metadata, obj: typed})
		}
	}
	return objs
}

func stripComments(doc string) string {
	var b strings.Builder
	for _, line := range strings.Split(doc, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(line), "#") {
			b.WriteString(line)
			b.WriteByte('\n')
		}
	}
	return b.String()
}

// workload is a pod template with where it came from.
type workload struct {
	object
	labels   map[string]string
	selector *metav1.LabelSelector
	pod      corev1.PodSpec
}

func workloads(objs []object) []workload {
	var ws []workload
	for _, o := range objs {
		switch v := o.obj.(type) {
		case *appsv1.Deployment:
			ws = append(ws, workload{o, v.Spec.Template.Labels, v.Spec.Selector, v.Spec.Template.Spec})
		case *appsv1.DaemonSet:
			ws = append(ws, workload{o, v.Spec.Template.Labels, v.Spec.Selector, v.Spec.Template.Spec})
		}
	}
	return ws
}

func find[T any](t *testing.T, objs []object, namespace, name string) T {
	t.Helper()
	for _, o := range objs {
		if v, ok := o.obj.(T); ok && o.meta.Namespace == namespace && o.meta.Name == name {
			return v
		}
	}
	var zero T
	t.Fatalf("no %T %s/%s in the manifests", zero, namespace, name)
	return zero
}

func TestManifestsDecodeStrictly(t *testing.T) {
	objs := loadManifests(t)
	seen := map[string]string{}
	for _, o := range objs {
		key := o.kind + " " + o.meta.Namespace + "/" + o.meta.Name
		if prev, dup := seen[key]; dup {
			t.Errorf("%s is defined twice (%s and %s)", key, prev, o.file)
		}
		seen[key] = o.file
	}
	// The decoder is strict: a misspelt field must fail, or this test
	// would prove nothing.
	bad := "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec:\n  replica: 1\n"
	if err := yaml.UnmarshalStrict([]byte(bad), &appsv1.Deployment{}); err == nil {
		t.Fatal("strict decoding accepted the unknown field spec.replica")
	}
	keys := make([]string, 0, len(seen))
	for k := range seen {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	t.Logf("decoded %d objects: %s", len(objs), strings.Join(keys, ", "))
}

func TestNamespacesAndReferencesResolve(t *testing.T) {
	objs := loadManifests(t)
	namespaces := map[string]bool{}
	for _, o := range objs {
		if o.kind == "Namespace" {
			namespaces[o.meta.Name] = true
		}
	}
	for _, o := range objs {
		if o.kind == "Namespace" {
			continue
		}
		if o.meta.Namespace == "" {
			t.Errorf("%s has no namespace: set one so the examples apply as a whole", o)
		} else if !namespaces[o.meta.Namespace] {
			t.Errorf("%s is in namespace %q, which no manifest creates", o, o.meta.Namespace)
		}
	}
	for _, w := range workloads(objs) {
		sel, err := metav1.LabelSelectorAsSelector(w.selector)
		if err != nil {
			t.Errorf("%s: selector: %v", w, err)
			continue
		}
		if sel.Empty() || !sel.Matches(labelSet(w.labels)) {
			t.Errorf("%s: selector %v does not match the pod template's labels %v", w, sel, w.labels)
		}
		for _, v := range w.pod.Volumes {
			if v.PersistentVolumeClaim != nil {
				find[*corev1.PersistentVolumeClaim](t, objs, w.meta.Namespace, v.PersistentVolumeClaim.ClaimName)
			}
		}
		mounted := map[string]bool{}
		for _, c := range append(append([]corev1.Container{}, w.pod.InitContainers...), w.pod.Containers...) {
			for _, m := range c.VolumeMounts {
				mounted[m.Name] = true
				if !hasVolume(w.pod, m.Name) {
					t.Errorf("%s: container %s mounts volume %q, which the pod does not define", w, c.Name, m.Name)
				}
			}
			for _, p := range probes(c) {
				if p.probe.HTTPGet != nil && p.probe.HTTPGet.Port.String() != "" && p.probe.HTTPGet.Port.IntValue() == 0 {
					if containerPort(c, p.probe.HTTPGet.Port.String()) == 0 {
						t.Errorf("%s: container %s: %s probe uses port %q, which the container does not name", w, c.Name, p.name, p.probe.HTTPGet.Port.String())
					}
				}
			}
		}
		for _, v := range w.pod.Volumes {
			if !mounted[v.Name] {
				t.Errorf("%s: volume %q is defined but never mounted", w, v.Name)
			}
		}
	}
}

type labelSet map[string]string

func (l labelSet) Has(k string) bool              { _, ok := l[k]; return ok }
func (l labelSet) Get(k string) string            { return l[k] }
func (l labelSet) Lookup(k string) (string, bool) { v, ok := l[k]; return v, ok }

func hasVolume(pod corev1.PodSpec, name string) bool {
	for _, v := range pod.Volumes {
		if v.Name == name {
			return true
		}
	}
	return false
}

func containerPort(c corev1.Container, name string) int32 {
	for _, p := range c.Ports {
		if p.Name == name {
			return p.ContainerPort
		}
	}
	return 0
}

type namedProbe struct {
	name  string
	probe *corev1.Probe
}

func probes(c corev1.Container) []namedProbe {
	var ps []namedProbe
	for _, p := range []namedProbe{{"startup", c.StartupProbe}, {"liveness", c.LivenessProbe}, {"readiness", c.ReadinessProbe}} {
		if p.probe != nil {
			ps = append(ps, p)
		}
	}
	return ps
}

// TestWorkloadsRunUnprivileged: nothing here needs root, privileges or
// capabilities: the tailnet is userspace WireGuard, and the node check
// only reads.
func TestWorkloadsRunUnprivileged(t *testing.T) {
	for _, w := range workloads(loadManifests(t)) {
		ps := w.pod.SecurityContext
		if ps == nil || ps.RunAsNonRoot == nil || !*ps.RunAsNonRoot {
			t.Errorf("%s: pod securityContext.runAsNonRoot is not true", w)
		}
		if ps == nil || ps.RunAsUser == nil || *ps.RunAsUser == 0 {
			t.Errorf("%s: pod securityContext.runAsUser must name a non-root uid", w)
		}
		if ps == nil || ps.SeccompProfile == nil || ps.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
			t.Errorf("%s: pod seccompProfile is not RuntimeDefault", w)
		}
		if w.pod.AutomountServiceAccountToken == nil || *w.pod.AutomountServiceAccountToken {
			t.Errorf("%s: automountServiceAccountToken must be false: the agent never talks to the API server", w)
		}
		if w.pod.HostPID || w.pod.HostIPC {
			t.Errorf("%s: hostPID/hostIPC must stay off", w)
		}
		for _, c := range append(append([]corev1.Container{}, w.pod.InitContainers...), w.pod.Containers...) {
			sc := c.SecurityContext
			if sc == nil {
				t.Errorf("%s: container %s has no securityContext", w, c.Name)
				continue
			}
			if sc.Privileged != nil && *sc.Privileged {
				t.Errorf("%s: container %s is privileged", w, c.Name)
			}
			if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
				t.Errorf("%s: container %s: allowPrivilegeEscalation must be false", w, c.Name)
			}
			if sc.Capabilities == nil || len(sc.Capabilities.Drop) != 1 || sc.Capabilities.Drop[0] != "ALL" {
				t.Errorf("%s: container %s must drop ALL capabilities", w, c.Name)
			}
			if sc.Capabilities != nil && len(sc.Capabilities.Add) > 0 {
				t.Errorf("%s: container %s adds capabilities %v", w, c.Name, sc.Capabilities.Add)
			}
			if sc.RunAsUser != nil && *sc.RunAsUser == 0 {
				t.Errorf("%s: container %s runs as uid 0", w, c.Name)
			}
			for _, e := range c.Env {
				if e.Name == "AGENT_TOKEN" && e.Value != "" {
					t.Errorf("%s: container %s has a literal AGENT_TOKEN: mount the token from a Secret and use AGENT_TOKEN_FILE", w, c.Name)
				}
			}
		}
		for _, v := range w.pod.Volumes {
			if v.HostPath == nil {
				continue
			}
			if !w.pod.HostNetwork {
				t.Errorf("%s: hostPath volume %s outside the node DaemonSet", w, v.Name)
			}
			for _, c := range w.pod.Containers {
				for _, m := range c.VolumeMounts {
					if m.Name == v.Name && !m.ReadOnly {
						t.Errorf("%s: hostPath %s is mounted writable at %s", w, v.HostPath.Path, m.MountPath)
					}
				}
			}
		}
	}
}

// envValue returns a container's literal environment value.
func envValue(c corev1.Container, name string) (string, bool) {
	for _, e := range c.Env {
		if e.Name == name && e.ValueFrom == nil {
			return e.Value, true
		}
	}
	return "", false
}

func TestWorkspaceTokenHealthAndCoordinator(t *testing.T) {
	objs := loadManifests(t)
	d := find[*appsv1.Deployment](t, objs, "workspaces", "ws1")
	if d.Spec.Replicas == nil || *d.Spec.Replicas != 1 {
		t.Error("the workspace must run exactly one replica: one agent per token")
	}
	if d.Spec.Strategy.Type != appsv1.RecreateDeploymentStrategyType {
		t.Error("the workspace must use the Recreate strategy, so old and new agents never run together")
	}
	pod := d.Spec.Template.Spec
	if len(pod.Containers) != 1 {
		t.Fatalf("workspace pod has %d containers, want 1", len(pod.Containers))
	}
	c := pod.Containers[0]
	if len(c.Command) != 0 || len(c.Args) != 0 {
		t.Errorf("the workspace container overrides the image's entrypoint (start-workspace): command %v args %v", c.Command, c.Args)
	}

	// Token: a file from a Secret, not readable by others.
	tokenFile, ok := envValue(c, "AGENT_TOKEN_FILE")
	if !ok {
		t.Fatal("AGENT_TOKEN_FILE is not set")
	}
	var fromSecret bool
	for _, m := range c.VolumeMounts {
		rel, err := filepath.Rel(m.MountPath, tokenFile)
		if err != nil || strings.HasPrefix(rel, "..") {
			continue
		}
		for _, v := range pod.Volumes {
			if v.Name != m.Name || v.Secret == nil {
				continue
			}
			if !m.ReadOnly {
				t.Errorf("the token volume is mounted writable")
			}
			if v.Secret.DefaultMode == nil || *v.Secret.DefaultMode&0o007 != 0 {
				t.Errorf("the token secret's defaultMode lets others read it; use 0440 with fsGroup")
			}
			if v.Secret.DefaultMode != nil && *v.Secret.DefaultMode&0o040 != 0 && (pod.SecurityContext.FSGroup == nil || *pod.SecurityContext.FSGroup != *pod.SecurityContext.RunAsGroup) {
				t.Errorf("the token is group-readable, but fsGroup is not the agent's group")
			}
			for _, it := range v.Secret.Items {
				if it.Path == rel {
					fromSecret = true
				}
			}
			if len(v.Secret.Items) == 0 {
				fromSecret = true
			}
		}
	}
	if !fromSecret {
		t.Errorf("AGENT_TOKEN_FILE=%s does not lie in a mounted Secret item", tokenFile)
	}

	// Health: the agent listens where the probes look.
	addr, ok := envValue(c, "AGENT_HEALTH_ADDR")
	if !ok {
		t.Fatal("AGENT_HEALTH_ADDR is not set: the agent's default (127.0.0.1) is unreachable for the kubelet")
	}
	host, port, found := strings.Cut(addr, ":")
	if !found || (host != "0.0.0.0" && host != "" && host != "[::]") {
		t.Errorf("AGENT_HEALTH_ADDR=%s must listen on all pod addresses (0.0.0.0:PORT)", addr)
	}
	wantPaths := map[string]string{"startup": "/healthz", "liveness": "/healthz", "readiness": "/readyz"}
	for _, p := range probes(c) {
		g := p.probe.HTTPGet
		if g == nil {
			t.Errorf("%s probe is not an HTTP GET", p.name)
			continue
		}
		if g.Path != wantPaths[p.name] {
			t.Errorf("%s probe path %s, want %s", p.name, g.Path, wantPaths[p.name])
		}
		probePort := g.Port.IntValue()
		if probePort == 0 {
			probePort = int(containerPort(c, g.Port.String()))
		}
		if fmt.Sprint(probePort) != port {
			t.Errorf("%s probe port %d, but the agent serves health on %s", p.name, probePort, port)
		}
		if g.Scheme != "" && g.Scheme != corev1.URISchemeHTTP {
			t.Errorf("%s probe scheme %s; the health endpoint is plain HTTP", p.name, g.Scheme)
		}
	}
	for _, name := range []string{"liveness", "readiness", "startup"} {
		found := false
		for _, p := range probes(c) {
			found = found || p.name == name
		}
		if !found {
			t.Errorf("the workspace has no %s probe", name)
		}
	}
	// The startup probe must outlast start-workspace's wait (30 attempts, 2 s apart).
	if sp := c.StartupProbe; sp != nil && sp.PeriodSeconds*sp.FailureThreshold < 90 {
		t.Errorf("the startup probe gives up after %d s; start-workspace may wait 60 s for the coordinator", sp.PeriodSeconds*sp.FailureThreshold)
	}

	// The coordinator URL points at the coordinator Service's TLS port.
	url, ok := envValue(c, "AGENT_URL")
	if !ok {
		t.Fatal("AGENT_URL is not set")
	}
	checkServiceURL(t, objs, url)
}

// checkServiceURL checks that an in-cluster https://NAME.NAMESPACE.svc:PORT
// URL names a Service port of the manifests.
func checkServiceURL(t *testing.T, objs []object, url string) {
	t.Helper()
	m := regexp.MustCompile(`^https://([a-z0-9-]+)\.([a-z0-9-]+)\.svc(?:\.cluster\.local)?:(\d+)$`).FindStringSubmatch(url)
	if m == nil {
		t.Errorf("AGENT_URL=%s is not https://SERVICE.NAMESPACE.svc:PORT", url)
		return
	}
	svc := find[*corev1.Service](t, objs, m[2], m[1])
	for _, p := range svc.Spec.Ports {
		if fmt.Sprint(p.Port) == m[3] && p.Protocol != corev1.ProtocolUDP {
			return
		}
	}
	t.Errorf("AGENT_URL=%s: Service %s/%s has no TCP port %s", url, m[2], m[1], m[3])
}

func TestNetcheckDaemonSetWatchesEveryNodeReadOnly(t *testing.T) {
	objs := loadManifests(t)
	ds := find[*appsv1.DaemonSet](t, objs, "agent-system", "agent-netcheck")
	pod := ds.Spec.Template.Spec
	if !pod.HostNetwork {
		t.Error("the node check needs hostNetwork: the node's bridges and veths live in its network namespace")
	}
	if pod.DNSPolicy != corev1.DNSClusterFirstWithHostNet {
		t.Errorf("dnsPolicy %s, want ClusterFirstWithHostNet", pod.DNSPolicy)
	}
	tolerateAll := false
	for _, tol := range pod.Tolerations {
		tolerateAll = tolerateAll || (tol.Operator == corev1.TolerationOpExists && tol.Key == "")
	}
	if !tolerateAll {
		t.Error("the DaemonSet must tolerate every taint to run on every node")
	}
	c := pod.Containers[0]
	args := append(append([]string{}, c.Command...), c.Args...)
	joined := " " + strings.Join(args, " ") + " "
	for _, want := range []string{" netcheck ", " --host ", " --watch ", " --root /host "} {
		if !strings.Contains(joined, want) {
			t.Errorf("netcheck container runs %q, which lacks %q", strings.TrimSpace(joined), strings.TrimSpace(want))
		}
	}
	if strings.Contains(joined, " --fix ") {
		t.Error("the DaemonSet must not run --fix: it changes node configuration")
	}
	want := map[string]bool{"/etc/systemd": false, "/run/systemd": false, "/usr/lib/systemd": false, "/lib/systemd": false}
	for _, v := range pod.Volumes {
		if v.HostPath == nil {
			continue
		}
		for _, m := range c.VolumeMounts {
			if m.Name != v.Name {
				continue
			}
			if m.MountPath != filepath.Join("/host", v.HostPath.Path) {
				t.Errorf("hostPath %s is mounted at %s, want %s (netcheck --root /host)", v.HostPath.Path, m.MountPath, filepath.Join("/host", v.HostPath.Path))
			}
			if _, ok := want[v.HostPath.Path]; ok {
				want[v.HostPath.Path] = true
			}
		}
	}
	for p, ok := range want {
		if !ok {
			t.Errorf("host directory %s is not mounted under /host", p)
		}
	}
	if c.SecurityContext == nil || c.SecurityContext.ReadOnlyRootFilesystem == nil || !*c.SecurityContext.ReadOnlyRootFilesystem {
		t.Error("the netcheck container should have a read-only root file system")
	}
}

// TestNetcheckPodProbeAndMetrics: the hunt, productized. A second DaemonSet
// runs netcheck on the pod network (not hostNetwork) so its round trips
// cross the node's bridge; both serve metrics on a named port with the
// scrape annotations and print one JSON document per change; the
// PrometheusRule pages on a broken pod network using series the exporter
// really has.
func TestNetcheckPodProbeAndMetrics(t *testing.T) {
	objs := loadManifests(t)
	exporter, err := os.ReadFile(filepath.Join("..", "agent", "netcheck", "exporter.go"))
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"agent-netcheck", "agent-netcheck-pod"} {
		ds := find[*appsv1.DaemonSet](t, objs, "agent-system", name)
		tmpl := ds.Spec.Template
		c := tmpl.Spec.Containers[0]
		joined := " " + strings.Join(append(append([]string{}, c.Command...), c.Args...), " ") + " "
		for _, want := range []string{" netcheck ", " --watch ", " --json ", " --metrics-addr "} {
			if !strings.Contains(joined, want) {
				t.Errorf("%s runs %q, which lacks %q", name, strings.TrimSpace(joined), strings.TrimSpace(want))
			}
		}
		port := tmpl.Annotations["prometheus.io/port"]
		if tmpl.Annotations["prometheus.io/scrape"] != "true" || port == "" {
			t.Errorf("%s: no prometheus.io scrape annotations: %v", name, tmpl.Annotations)
		}
		if p := containerPort(c, "metrics"); fmt.Sprint(p) != port || !strings.Contains(joined, fmt.Sprintf(":%d ", p)) {
			t.Errorf("%s: metrics port %d, annotation %q, args %q should agree", name, p, port, joined)
		}
		if name == "agent-netcheck-pod" {
			if tmpl.Spec.HostNetwork {
				t.Error("the pod probe must be on the pod network: its round trips must cross the node's bridge")
			}
			if strings.Contains(joined, " --host ") {
				t.Error("the pod probe checks its own network, not the node's")
			}
		}
	}
	rule := find[*prometheusRule](t, objs, "agent-system", "agent-netcheck")
	metric := regexp.MustCompile(`agent_netcheck_[a-z_]+`)
	paged := false
	for _, g := range rule.Spec.Groups {
		for _, r := range g.Rules {
			for _, m := range metric.FindAllString(r.Expr, -1) {
				if !strings.Contains(string(exporter), `"`+m+`"`) {
					t.Errorf("alert %s uses %s, which the exporter does not export", r.Alert, m)
				}
			}
			if r.Labels["severity"] == "page" && strings.Contains(r.Expr, `mode="workspace"`) && strings.Contains(r.Expr, "== 2") {
				paged = true
			}
		}
	}
	if !paged {
		t.Error("no alert pages on a pod network reported broken")
	}
}

// TestNetcheckDaemonSetStartsOnAnyNode: a node without systemd, or with
// Docker and no CNI configuration, lacks some of the mounted directories;
// a hostPath of type Directory would keep the pod from starting there.
func TestNetcheckDaemonSetStartsOnAnyNode(t *testing.T) {
	ds := find[*appsv1.DaemonSet](t, loadManifests(t), "agent-system", "agent-netcheck")
	for _, v := range ds.Spec.Template.Spec.Volumes {
		if v.HostPath == nil {
			continue
		}
		if v.HostPath.Type == nil || *v.HostPath.Type != corev1.HostPathDirectoryOrCreate {
			t.Errorf("hostPath %s has type %v: want DirectoryOrCreate, so nodes without it still run the check", v.HostPath.Path, v.HostPath.Type)
		}
	}
}
