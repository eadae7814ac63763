-- Deleting a user keeps the row (other members' history references it as sender)
-- but frees the name: only live users' names are unique.
ALTER TABLE users ADD COLUMN deleted_at timestamptz;
ALTER TABLE users DROP CONSTRAINT users_username_key;
CREATE UNIQUE INDEX users_live_username ON users (username) WHERE deleted_at IS NULL;
