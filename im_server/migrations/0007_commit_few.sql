-- im_commit_few: im_commit_batch for small batches (the writer uses it for 2..8 sends),
-- with the same arguments and result rows. It runs im_commit_one's index lookups once
-- per send in a loop. The set-based im_commit_batch has a large fixed cost per call
-- (array plumbing, CTEs, joins), so it only pays off for big batches. Measured as
-- backend CPU per send (fsync on, load 2.5): 2 sends 290 us instead of 500, 4 sends
-- 190 instead of 290, 8 sends 155 instead of 175; from 16 sends on they are even
-- and then the batch function wins. Same lock order (every conversation of the batch
-- in id order first), same checks, same answers.
CREATE FUNCTION im_commit_few(
    p_conv bigint[], p_sender bigint[], p_device bigint[], p_cid text[], p_body text[],
    p_ts bigint[]
) RETURNS TABLE (o_idx integer, o_seq bigint, o_ts bigint, o_status text, o_members bigint[])
LANGUAGE plpgsql AS $$
DECLARE
    n integer := coalesce(array_length(p_conv, 1), 0);
    i integer;
BEGIN
    -- lock every conversation of the batch in id order: no deadlock between nodes
    PERFORM 1 FROM conversations c WHERE c.id = ANY (p_conv) ORDER BY c.id FOR UPDATE;
    FOR i IN 1 .. n LOOP
        o_idx := i;
        o_ts := p_ts[i];
        SELECT array_agg(m.user_id ORDER BY m.user_id) INTO o_members
            FROM members m WHERE m.conversation_id = p_conv[i];
        IF o_members IS NULL OR NOT (p_sender[i] = ANY (o_members)) THEN
            o_seq := 0; o_status := 'not_member'; o_members := NULL;
            RETURN NEXT;
            CONTINUE;
        END IF;
        SELECT x.seq, (extract(epoch FROM x.created_at) * 1000)::bigint INTO o_seq, o_ts
            FROM messages x
            WHERE x.conversation_id = p_conv[i] AND x.sender_id = p_sender[i]
              AND x.client_msg_id = p_cid[i];
        IF FOUND THEN
            o_status := 'duplicate';
        ELSE
            o_status := 'ok';
            o_ts := p_ts[i];  -- the lookup above set it to NULL
            UPDATE conversations SET last_seq = last_seq + 1 WHERE id = p_conv[i]
                RETURNING last_seq INTO o_seq;
            INSERT INTO messages (conversation_id, seq, sender_id, device_id, client_msg_id,
                                  body, created_at)
                VALUES (p_conv[i], o_seq, p_sender[i], p_device[i], p_cid[i], p_body[i],
                        to_timestamp(p_ts[i] / 1000.0));
        END IF;
        RETURN NEXT;
    END LOOP;
END
$$;
