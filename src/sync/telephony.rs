//! Telephony mode: register → finish (with the link, or → attachRecord) chains, and standalone
//! attachRecord for portals that refuse it inside a batch.

use super::*;
use crate::bitrix24::api::telephony::CallRef;
use crate::config::Delivery;

/// Fact: "no" once the portal refused `attachRecord` inside a batch.
pub(super) const FACT_ATTACH_IN_BATCH: &str = "bitrix24.attach_record_in_batch";

/// Fact: `no:<record_check_after>` once a recording check found none of the links sent in
/// `finish` downloaded, `yes` once one was.
pub(super) const FACT_FINISH_TAKES_LINK: &str = "bitrix24.finish_record_url";

/// Calls whose recording goes in `finish` that are sent first, and checked at once, while the
/// portal's handling of finish's link is unknown: at most this many recordings are sent twice
/// on a portal that does not download them.
const LEARN_FROM: usize = 25;

pub(super) async fn push_telephony(
    ctx: &SyncCtx,
    opts: &PassOptions,
    s: &mut PassSummary,
    mut due: Vec<Due>,
    users: &HashMap<String, i64>,
) -> Result<(), SyncError> {
    // A `rules.crm_order` other than Bitrix24's own names each new call's entity in register.
    let entities = if ctx.cfg.rules.crm_order_is_bitrix24s() {
        HashMap::new()
    } else {
        let mut numbers: Vec<String> = due
            .iter()
            .filter(|d| d.item.ledger.stage == Stage::Pending)
            .map(|d| d.facts.client_number.clone())
            .collect();
        numbers.sort();
        numbers.dedup();
        super::activity::find_entities(ctx, &numbers).await?
    };
    // While this portal has not shown whether it downloads finish's link, a first slice of the
    // calls goes alone and is checked at once: the rest are planned with what it taught.
    let unknown = ctx.store.lock().fact(FACT_FINISH_TAKES_LINK)?.is_none();
    let learning = unknown
        && !opts.dry_run
        && ctx.cfg.sync.record_url_on_finish
        && ctx.cfg.sync.record_check_after.is_zero()
        && ctx.cfg.recordings.delivery == Delivery::Link;
    if learning {
        let with_link = |d: &Due| {
            d.facts.link.is_some()
                && matches!(d.item.ledger.stage, Stage::Pending | Stage::Registered)
        };
        let mut linked = 0;
        let cut = due
            .iter()
            .position(|d| {
                linked += usize::from(with_link(d));
                linked > LEARN_FROM
            })
            .unwrap_or(due.len());
        if linked >= 1 {
            let rest = due.split_off(cut);
            send_telephony(ctx, opts, s, due, users, &entities).await?;
            if record_check::check_finish_records(ctx, s).await? > 0 {
                tracing::info!("recordings sent in finish were not downloaded: the rest of this push sends them by attachRecord");
            }
            due = rest;
        }
    }
    send_telephony(ctx, opts, s, due, users, &entities).await
}

/// Plans and sends telephony chains for `due`, with what the portal has shown it takes.
async fn send_telephony(
    ctx: &SyncCtx,
    opts: &PassOptions,
    s: &mut PassSummary,
    due: Vec<Due>,
    users: &HashMap<String, i64>,
    entities: &HashMap<String, crate::bitrix24::api::crm::Entity>,
) -> Result<(), SyncError> {
    let now = ctx.clock.now();
    // Uploaded recordings go one request each (a file is no batch parameter).
    let attach_in_batch = ctx.cfg.recordings.delivery == Delivery::Link
        && ctx.store.lock().fact(FACT_ATTACH_IN_BATCH)?.as_deref() != Some("no");
    let portal = plan::Portal {
        attach_in_batch,
        finish_takes_link: record_check::finish_takes_link(
            ctx,
            ctx.store.lock().fact(FACT_FINISH_TAKES_LINK)?.as_deref(),
        ),
    };
    let planned = push_plan::plan_telephony(&ctx.cfg, due, users, entities, portal);
    let (commands, batches) = planned.size();
    tracing::debug!(
        calls = planned.chains.len(),
        commands,
        batches,
        quarantined = planned.quarantines.len(),
        "telephony push planned"
    );
    if opts.dry_run {
        s.plan.extend(planned.describe());
    }
    settle_quarantines(ctx, opts, s, planned.quarantines, now)?;
    let facts = planned.facts;
    let chains = planned.chains;
    if opts.dry_run {
        if !attach_in_batch {
            let why = if ctx.cfg.recordings.delivery == Delivery::Upload {
                "standalone, with the file ubsync downloads (recordings.delivery = \"upload\")"
            } else {
                "standalone: this portal refuses it in a batch"
            };
            s.plan.extend(
                facts
                    .values()
                    .filter(|(f, _)| f.link.is_some())
                    .map(|(f, _)| {
                        format!("call {}: telephony.externalCall.attachRecord ({why})", f.id)
                    }),
            );
        }
        s.plan.extend(missed_task_lines(ctx, &facts));
        return Ok(());
    }
    let cfg = &ctx.cfg;
    let mut pushed = 0;
    let mut recordings = 0;
    let mut in_finish = 0;
    let mut refused_in_batch = false;
    let mut accepted_in_batch = false;
    send_plans(
        ctx,
        chains,
        |id, l, out| {
            let (f, hash) = &facts[id];
            let before = l.stage;
            let had_record = l.record_url.clone();
            if out
                .errors
                .get(&plan::key("a", id))
                .is_some_and(|e| e.effective_code() == "ERROR_BATCH_METHOD_NOT_ALLOWED")
            {
                refused_in_batch = true;
            }
            accepted_in_batch |= out.results.contains_key(&plan::key("a", id));
            let (row, reason) = plan::record_chain(cfg, portal, f, l, out, hash, now);
            if matches!(row.stage, Stage::Finished | Stage::Done)
                && !matches!(before, Stage::Finished | Stage::Done)
            {
                pushed += 1;
            }
            if row.record_url.is_some() && row.record_url != had_record {
                // A link in finish proves nothing yet: counted apart until a check finds it.
                if row.record_check_at.is_some() {
                    in_finish += 1;
                } else {
                    recordings += 1;
                }
            }
            (row, reason)
        },
        s,
    )
    .await?;
    s.pushed += pushed;
    s.recordings += recordings;
    s.recordings_in_finish += in_finish;
    if refused_in_batch {
        tracing::warn!("this portal refuses attachRecord inside a batch; recordings now go as separate requests");
        ctx.store.lock().set_fact(FACT_ATTACH_IN_BATCH, "no", now)?;
    } else if accepted_in_batch && attach_in_batch {
        ctx.store
            .lock()
            .set_fact(FACT_ATTACH_IN_BATCH, "yes", now)?;
    }
    if refused_in_batch || !attach_in_batch {
        attach_standalone(ctx, s).await?;
    }
    Ok(())
}

/// Attaches recordings one request at a time (still through the request budget), for portals
/// that refuse `attachRecord` inside a batch.
pub(super) async fn attach_standalone(ctx: &SyncCtx, s: &mut PassSummary) -> Result<(), SyncError> {
    let cfg = &ctx.cfg;
    let items = ctx.store.lock().work_due(ctx.clock.now())?;
    let known = known_lines(ctx)?;
    for w in items
        .into_iter()
        .filter(|w| w.ledger.stage == Stage::Finished)
    {
        let Some(f) = stored_facts(ctx, &known, &w.raw) else {
            continue;
        };
        if !plan::needs_recording(&f, &w.ledger) {
            continue;
        }
        let call = CallRef::Known(w.ledger.b24_call_id.clone().unwrap_or_default());
        let Some(mut command) = plan::attach_record(&f, &call) else {
            continue;
        };
        if cfg.recordings.delivery == Delivery::Upload {
            let link = f.link.clone().unwrap_or_default();
            let fetched = tokio::select! {
                r = crate::recording::fetch(&ctx.recordings, cfg, &link) => r,
                _ = ctx.cancel.cancelled() => return Err(SyncError::Cancelled),
            };
            match fetched {
                Ok(rec) => {
                    use base64::Engine as _;
                    command = api::telephony::attach_record_file(
                        command.key,
                        &call,
                        &format!("{}.{}", f.external_id, rec.extension),
                        base64::engine::general_purpose::STANDARD.encode(&rec.bytes),
                    );
                }
                Err(e) => {
                    let now = ctx.clock.now();
                    tracing::warn!(call = %f.id, error = %e, "recording not downloaded; a later pass tries again");
                    s.recording_downloads_failed += 1;
                    let failure = match e {
                        crate::recording::FetchError::Retry(why) => plan::Failure::Retry(why),
                        crate::recording::FetchError::Refused(why) => plan::Failure::Permanent(why),
                    };
                    let (row, reason) = plan::fail(w.ledger.clone(), failure, now);
                    let quarantine: Vec<NewQuarantine> = reason
                        .map(|reason| NewQuarantine {
                            source: "unitalk",
                            call_id: Some(f.id.clone()),
                            raw: w.raw.clone(),
                            reason: format!("recording: {reason}"),
                        })
                        .into_iter()
                        .collect();
                    s.quarantined += quarantine.len() as u64;
                    ctx.store.lock().apply(&[row], &quarantine, None, now)?;
                    continue;
                }
            }
        }
        let result = tokio::select! {
            r = ctx.b24.call(&command.method, Value::Object(command.params.clone())) => r,
            _ = ctx.cancel.cancelled() => return Err(SyncError::Cancelled),
        };
        let now = ctx.clock.now();
        let (row, reason) = match result.map(|env| plan::attached(&env.result)) {
            Ok(Ok(())) => {
                let mut l = w.ledger.clone();
                l.record_url = f.link.clone();
                l.record_check_at = None;
                s.recordings += 1;
                (plan::settle_stage(cfg, &f, l, &w.content_hash), None)
            }
            Ok(Err(why)) => plan::fail(w.ledger.clone(), plan::Failure::Retry(why), now),
            Err(Bitrix24Error::Api {
                code, description, ..
            }) => plan::fail(
                w.ledger.clone(),
                plan::classify_error(
                    &command.method,
                    &crate::bitrix24::wire::ErrorBody { code, description },
                ),
                now,
            ),
            Err(e) if e.is_retryable() && !e.needs_admin() => {
                tracing::warn!(error = %e, call = %f.id, "recording not attached; a later pass retries");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let quarantine: Vec<NewQuarantine> = reason
            .map(|reason| NewQuarantine {
                source: "bitrix24",
                call_id: Some(f.id.clone()),
                // An uploaded file is no quarantine material: its parameters without the content.
                raw: api::telephony::without_file(&command).encode(),
                reason,
            })
            .into_iter()
            .collect();
        s.quarantined += quarantine.len() as u64;
        ctx.store.lock().apply(&[row], &quarantine, None, now)?;
    }
    Ok(())
}
