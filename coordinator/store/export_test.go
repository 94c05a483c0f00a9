package store

import "time"

// SetClock lets the external contract test drive token expiry.
func SetClock(s *Store, now func() time.Time) { s.now = now }
