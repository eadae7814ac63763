-- Accounts, devices (one per login), conversations, members, messages, positions.
CREATE TABLE users (
    id            bigserial PRIMARY KEY,
    username      text NOT NULL UNIQUE,
    password_hash text NOT NULL,
    disabled      boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE devices (
    id           bigserial PRIMARY KEY,
    user_id      bigint NOT NULL REFERENCES users(id),
    name         text NOT NULL DEFAULT '',
    refresh_hash bytea NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz
);
CREATE INDEX devices_user ON devices(user_id);

CREATE TABLE conversations (
    id         bigserial PRIMARY KEY,
    kind       text NOT NULL CHECK (kind IN ('direct', 'group')),
    title      text NOT NULL DEFAULT '',
    -- 'low:high' user ids of a direct conversation: at most one per pair
    direct_key text UNIQUE,
    last_seq   bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind = 'direct') = (direct_key IS NOT NULL))
);

CREATE TABLE members (
    conversation_id bigint NOT NULL REFERENCES conversations(id),
    user_id         bigint NOT NULL REFERENCES users(id),
    read_seq        bigint NOT NULL DEFAULT 0,
    joined_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (conversation_id, user_id)
);
CREATE INDEX members_user ON members(user_id);

CREATE TABLE messages (
    conversation_id bigint NOT NULL REFERENCES conversations(id),
    seq             bigint NOT NULL,
    sender_id       bigint NOT NULL REFERENCES users(id),
    device_id       bigint NOT NULL,
    client_msg_id   text NOT NULL,
    body            text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (conversation_id, seq),
    UNIQUE (conversation_id, sender_id, client_msg_id)
);

CREATE TABLE device_positions (
    device_id       bigint NOT NULL REFERENCES devices(id),
    conversation_id bigint NOT NULL REFERENCES conversations(id),
    received_seq    bigint NOT NULL,
    PRIMARY KEY (device_id, conversation_id)
);
