package store_test

import (
	"testing"
	"time"

	"github.com/agentd/agent/coordinator/store"
	"github.com/agentd/agent/coordinator/store/storetest"
)

func TestBoltContract(t *testing.T) {
	storetest.Run(t, func(t *testing.T) storetest.Opener {
		dir := t.TempDir()
		return func(now func() time.Time) (store.Backend, error) {
			s, err := store.Open(dir)
			if err != nil {
				return nil, err
			}
			store.SetClock(s, now)
			return s, nil
		}
	})
}
