-- Coordinator replicas sharing this database, and the peers and tunnels
-- each holds, so replicas can relay between peers connected to different
-- replicas. Rows change with every connection; NOTIFY on coord_events
-- names what changed and receivers read the rows.
CREATE TABLE replicas (
	id          text PRIMARY KEY,
	-- Where the other replicas reach this one's DERP relay for the mesh,
	-- and the fingerprint of its certificate ("" for a CA-signed one).
	url         text NOT NULL,
	fingerprint text NOT NULL DEFAULT '',
	started     timestamptz NOT NULL DEFAULT now(),
	heartbeat   timestamptz NOT NULL DEFAULT now()
);

-- Every session registration takes a new epoch; a write guarded by an
-- older epoch is from a session that another replica took over.
CREATE SEQUENCE peer_epoch;

CREATE TABLE peers (
	id        bigint PRIMARY KEY,
	replica   text NOT NULL,
	epoch     bigint NOT NULL,
	role      text NOT NULL,
	name      text NOT NULL,
	user_name text NOT NULL,
	node      jsonb,
	network   jsonb,
	updated   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX peers_replica ON peers (replica);
-- DERP admission on any replica asks whether any replica registered a key.
CREATE INDEX peers_node_key ON peers ((node ->> 'key'));

CREATE TABLE tunnels (
	client     bigint NOT NULL,
	agent      bigint NOT NULL,
	agent_name text NOT NULL,
	replica    text NOT NULL,
	epoch      bigint NOT NULL,
	PRIMARY KEY (client, agent)
);
CREATE INDEX tunnels_agent ON tunnels (agent);
CREATE INDEX tunnels_replica ON tunnels (replica);
