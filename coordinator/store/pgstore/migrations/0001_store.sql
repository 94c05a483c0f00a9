-- The store's records. Each row keeps the whole record as a JSON document
-- (doc), the same shape the bbolt store keeps, so adding a field to a
-- record needs no migration; the typed columns beside it are the keys,
-- references and indexes the queries use.
CREATE TABLE users (
	name text PRIMARY KEY,
	doc  jsonb NOT NULL
);

CREATE TABLE agents (
	name  text PRIMARY KEY,
	id    bigint NOT NULL UNIQUE,
	owner text NOT NULL REFERENCES users (name),
	doc   jsonb NOT NULL
);
CREATE INDEX agents_owner ON agents (owner);

CREATE TABLE grants (
	user_name text NOT NULL REFERENCES users (name) ON DELETE CASCADE,
	agent     text NOT NULL REFERENCES agents (name) ON DELETE CASCADE,
	doc       jsonb NOT NULL,
	PRIMARY KEY (user_name, agent)
);
CREATE INDEX grants_agent ON grants (agent);

-- Tokens: only the SHA-256 of each secret is kept.
CREATE TABLE tokens (
	id      text PRIMARY KEY,
	hash    text NOT NULL UNIQUE,
	kind    text NOT NULL,
	subject text NOT NULL,
	doc     jsonb NOT NULL
);
CREATE INDEX tokens_subject ON tokens (kind, subject);

-- Named random secrets shared by every replica (the resume-token key).
CREATE TABLE secrets (
	name  text PRIMARY KEY,
	value bytea NOT NULL
);
