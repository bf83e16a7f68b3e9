//! Events in, processed from the store's inbox. A Unitalk call webhook whose call has ended
//! goes through the same observe → ledger → push path as a polled record, keyed by the same
//! identity (`webhooks.unitalk_id_field` of the webhook call is the history `id`). One call seen
//! by both paths under different ids (same direction and client, starting within
//! `webhooks.twin_slack`) is logged loudly and kept once.

use super::*;

/// Most events processed per round.
const BATCH: usize = 200;

/// `direction|client digits`: what both paths agree on for one call.
pub(crate) fn fingerprint(c: &crate::unitalk::Call) -> String {
    let digits = |s: &str| s.chars().filter(char::is_ascii_digit).collect::<String>();
    let client = match c.direction {
        crate::unitalk::Direction::Out => c.to.first().map(|t| digits(t)).unwrap_or_default(),
        _ => digits(&c.from),
    };
    format!("{}|{client}", c.direction.as_str())
}

/// Quarantines a webhook body with `reason`; returns the inbox outcome.
fn quarantine_webhook(
    ctx: &SyncCtx,
    s: &mut PassSummary,
    body: &str,
    reason: String,
) -> Result<String, SyncError> {
    tracing::warn!(%reason, "quarantining a Unitalk webhook");
    ctx.store.lock().apply(
        &[],
        &[NewQuarantine {
            source: "unitalk",
            call_id: None,
            raw: body.to_string(),
            reason: reason.clone(),
        }],
        None,
        ctx.clock.now(),
    )?;
    s.quarantined += 1;
    Ok(format!("quarantined: {reason}"))
}

/// Processes waiting Unitalk webhook events; returns how many calls they brought.
pub(super) fn process_unitalk(ctx: &SyncCtx, s: &mut PassSummary) -> Result<u64, SyncError> {
    if ctx.cfg.webhooks.unitalk_secret.is_none() {
        // Events stored while the route was on wait for nothing now; the poller has the calls.
        ctx.store.lock().inbox_drop(
            "unitalk",
            "ignored: webhooks.unitalk_secret is no longer set",
            ctx.clock.now(),
        )?;
        return Ok(0);
    }
    let items = ctx.store.lock().inbox_pending("unitalk", BATCH)?;
    let field = ctx.cfg.webhooks.unitalk_id_field.clone();
    let mut brought = 0;
    for item in items {
        let outcome = match crate::unitalk::webhook::webhook_call(
            &item.body,
            item.content_type.as_deref(),
        ) {
            Err(e) => quarantine_webhook(
                ctx,
                s,
                &item.body,
                format!("unreadable Unitalk webhook: {e}"),
            )?,
            Ok((event, _))
                if !matches!(
                    event.as_str(),
                    "" | "CALL_END" | "CALL_NEW" | "CALL_ANSWER" | "CALL_REDIRECT"
                ) =>
            {
                format!("ignored: unknown event {event}")
            }
            Ok((event, call)) if !crate::unitalk::webhook::is_final(&event, &call) => {
                format!("ignored: {event} (not final)")
            }
            Ok((_, mut call)) => {
                let id = call.get(&field).cloned().filter(|v| !v.is_null());
                match id {
                    None => {
                        let reason = format!(
                            "the webhook call has no `{field}`, so it cannot be named as history names it (webhooks.unitalk_id_field)"
                        );
                        quarantine_webhook(ctx, s, &item.body, reason)?
                    }
                    Some(id) => {
                        call["id"] = id;
                        brought += observe_from(ctx, &[call], s, "webhook")?;
                        "observed".to_string()
                    }
                }
            }
        };
        ctx.store
            .lock()
            .inbox_done(item.id, &outcome, ctx.clock.now())?;
    }
    s.from_webhooks += brought;
    Ok(brought)
}

/// Keeps only the records not already known under another id from the other path; records the
/// path of the new ones. Returns the records to observe.
pub(super) fn sift_twins(
    ctx: &SyncCtx,
    records: &[Value],
    path: &str,
) -> Result<Vec<Value>, SyncError> {
    if ctx.cfg.webhooks.unitalk_secret.is_none() {
        return Ok(records.to_vec());
    }
    let slack = ctx.cfg.webhooks.twin_slack_secs;
    let mut out = Vec::with_capacity(records.len());
    for raw in records {
        let Ok(c) = parse(ctx, raw) else {
            out.push(raw.clone());
            continue;
        };
        let store = ctx.store.lock();
        if store.seen(&c.id)? {
            out.push(raw.clone());
            continue;
        }
        let fp = fingerprint(&c);
        if let Some(other) = store.twin(&c.id, &fp, c.started_at, slack)? {
            tracing::error!(
                call = %c.id, other = %other, path,
                "the same call seems to arrive under two ids (webhook and history); it is kept once. Check webhooks.unitalk_id_field (history `id` should equal the webhook's field)"
            );
            continue;
        }
        store.seen_by_add(&c.id, path, &fp, c.started_at)?;
        out.push(raw.clone());
    }
    Ok(out)
}

/// Observes records that came by `path`, minus those the other path knows under another id.
fn observe_from(
    ctx: &SyncCtx,
    records: &[Value],
    s: &mut PassSummary,
    path: &str,
) -> Result<u64, SyncError> {
    let records = sift_twins(ctx, records, path)?;
    let before = s.new;
    pull::observe(ctx, &records, pull::pushed_range(ctx.clock.now()), s)?;
    Ok(s.new - before)
}
