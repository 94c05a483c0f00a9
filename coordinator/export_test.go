package coordinator

import "sync"

// HoldReplicaEvents stops s from applying other replicas' changes until
// the returned function is called (once or more), as if s were too
// loaded to notice.
func HoldReplicaEvents(s *Server) (release func()) {
	s.repl.held.Lock()
	return sync.OnceFunc(s.repl.held.Unlock)
}

// StandIns counts the peers of other replicas s mirrors.
func StandIns(s *Server) int { return len(s.core.remotes()) }
