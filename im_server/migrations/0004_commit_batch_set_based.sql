-- im_commit_batch v3: membership, dedup, insert and member lists as one set-based
-- statement each instead of four statements per message. The caller sends each
-- (conversation, sender, client id) at most once per batch.
CREATE OR REPLACE FUNCTION im_commit_batch(
    p_conv bigint[], p_sender bigint[], p_device bigint[], p_cid text[], p_body text[],
    p_ts bigint[]
) RETURNS TABLE (o_idx integer, o_seq bigint, o_ts bigint, o_status text, o_members bigint[])
LANGUAGE plpgsql AS $$
DECLARE
    n integer := coalesce(array_length(p_conv, 1), 0);
    i integer;
    k integer;
    v_ids bigint[];
    v_last bigint[];
    v_first bigint[];
    v_seq bigint[] := array_fill(0::bigint, ARRAY[n]);
    v_ts bigint[] := p_ts;
    v_status text[] := array_fill('ok'::text, ARRAY[n]);
    r record;
BEGIN
    IF n = 0 THEN
        RETURN;
    END IF;
    -- lock every conversation of the batch in id order: no deadlock between nodes
    SELECT array_agg(l.id ORDER BY l.id), array_agg(l.last_seq ORDER BY l.id)
        INTO v_ids, v_last
        FROM (SELECT c.id, c.last_seq FROM conversations c
              WHERE c.id = ANY (p_conv) ORDER BY c.id FOR UPDATE) l;
    v_first := v_last;
    FOR r IN
        SELECT t.i FROM unnest(p_conv, p_sender) WITH ORDINALITY AS t(conv, sender, i)
        WHERE NOT EXISTS (SELECT 1 FROM members m
                          WHERE m.conversation_id = t.conv AND m.user_id = t.sender)
    LOOP
        v_status[r.i] := 'not_member';
    END LOOP;
    FOR r IN
        SELECT t.i, x.seq, (extract(epoch FROM x.created_at) * 1000)::bigint AS ts
        FROM unnest(p_conv, p_sender, p_cid) WITH ORDINALITY AS t(conv, sender, cid, i)
        JOIN messages x ON x.conversation_id = t.conv AND x.sender_id = t.sender
                       AND x.client_msg_id = t.cid
    LOOP
        IF v_status[r.i] = 'ok' THEN
            v_status[r.i] := 'duplicate';
            v_seq[r.i] := r.seq;
            v_ts[r.i] := r.ts;
        END IF;
    END LOOP;
    FOR i IN 1 .. n LOOP
        IF v_status[i] = 'ok' THEN
            k := array_position(v_ids, p_conv[i]);
            v_last[k] := v_last[k] + 1;
            v_seq[i] := v_last[k];
        END IF;
    END LOOP;
    INSERT INTO messages (conversation_id, seq, sender_id, device_id, client_msg_id, body,
                          created_at)
        SELECT p_conv[j], v_seq[j], p_sender[j], p_device[j], p_cid[j], p_body[j],
               to_timestamp(p_ts[j] / 1000.0)
        FROM generate_subscripts(p_conv, 1) AS j WHERE v_status[j] = 'ok';
    UPDATE conversations c SET last_seq = u.last_seq
        FROM unnest(v_ids, v_last, v_first) AS u(id, last_seq, first_seq)
        WHERE c.id = u.id AND u.last_seq <> u.first_seq;
    RETURN QUERY
        WITH mm AS (
            SELECT m.conversation_id, array_agg(m.user_id ORDER BY m.user_id) AS members
            FROM members m WHERE m.conversation_id = ANY (p_conv) GROUP BY 1
        )
        SELECT j::integer, v_seq[j], v_ts[j], v_status[j],
               CASE WHEN v_status[j] = 'not_member' THEN NULL ELSE mm.members END
        FROM generate_subscripts(p_conv, 1) AS j
        LEFT JOIN mm ON mm.conversation_id = p_conv[j];
END
$$;
