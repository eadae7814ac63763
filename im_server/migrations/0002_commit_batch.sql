-- Group commit in one round trip: lock the batch's conversations in id order (no
-- deadlock between nodes), then per send: membership check, dedup on the client
-- message id, next gapless seq, insert. Runs inside the caller's single statement.
CREATE FUNCTION im_commit_batch(
    p_conv bigint[], p_sender bigint[], p_device bigint[], p_cid text[], p_body text[],
    p_ts bigint[]
) RETURNS TABLE (o_idx integer, o_seq bigint, o_ts bigint, o_status text, o_members bigint[])
LANGUAGE plpgsql AS $$
DECLARE
    i integer;
    v_members bigint[];
BEGIN
    PERFORM 1 FROM conversations c WHERE c.id = ANY (p_conv) ORDER BY c.id FOR UPDATE;
    FOR i IN 1 .. coalesce(array_length(p_conv, 1), 0) LOOP
        o_idx := i;
        SELECT array_agg(m.user_id ORDER BY m.user_id) INTO v_members
            FROM members m WHERE m.conversation_id = p_conv[i];
        IF v_members IS NULL OR NOT (p_sender[i] = ANY (v_members)) THEN
            o_seq := 0; o_ts := 0; o_status := 'not_member'; o_members := NULL;
            RETURN NEXT;
            CONTINUE;
        END IF;
        o_members := v_members;
        SELECT x.seq, (extract(epoch FROM x.created_at) * 1000)::bigint INTO o_seq, o_ts
            FROM messages x
            WHERE x.conversation_id = p_conv[i] AND x.sender_id = p_sender[i]
              AND x.client_msg_id = p_cid[i];
        IF FOUND THEN
            o_status := 'duplicate';
        ELSE
            UPDATE conversations c SET last_seq = c.last_seq + 1 WHERE c.id = p_conv[i]
                RETURNING c.last_seq INTO o_seq;
            o_ts := p_ts[i];
            INSERT INTO messages (conversation_id, seq, sender_id, device_id, client_msg_id,
                                  body, created_at)
                VALUES (p_conv[i], o_seq, p_sender[i], p_device[i], p_cid[i], p_body[i],
                        to_timestamp(p_ts[i] / 1000.0));
            o_status := 'ok';
        END IF;
        RETURN NEXT;
    END LOOP;
END
$$;
