//! Click-to-call and CRM callback requests (Bitrix24 events, processed from the inbox).
//!
//! A click: Bitrix24 has registered the call and sends its `CALL_ID`; ubsync asks Unitalk to
//! ring the user's inner line and then the number (`phones/directCall`), and the outgoing call
//! that comes of it (from that line, to that number, soon after the click) claims the click: its
//! ledger row takes the click's `CALL_ID`, so it is finished and its recording attached, never
//! registered. A callback form: ubsync picks the operator, registers the call (`TYPE=4`,
//! `EXTERNAL_CALL_ID = unitalk-cb-<id>`) and goes on the same way. A click that cannot ring or
//! finds no call within `webhooks.click_ttl` is finished as cancelled (`603-S`), so no card hangs.

use super::*;
use crate::store::clicks::Click;

/// The portal fact set when `ONAPPUNINSTALL` arrives.
pub const FACT_UNINSTALLED: &str = "bitrix24.uninstalled";

/// A repeat click on the same number by the same user within this is one click.
const DEBOUNCE_SECS: i64 = 5;

/// How early before the click the Unitalk call may start (clock skew).
const SKEW_SECS: i64 = 60;

fn digits(s: &str) -> String {
    s.chars().filter(char::is_ascii_digit).collect()
}

/// Processes waiting Bitrix24 events into click rows (and the uninstall fact).
pub(super) fn process_bitrix24(ctx: &SyncCtx, s: &mut PassSummary) -> Result<(), SyncError> {
    if !ctx.cfg.webhooks.bitrix24_events {
        ctx.store.lock().inbox_drop(
            "bitrix24",
            "ignored: webhooks.bitrix24_events is off",
            ctx.clock.now(),
        )?;
        return Ok(());
    }
    let items = ctx.store.lock().inbox_pending("bitrix24", 200)?;
    let country = ctx.cfg.sync.default_country;
    for item in items {
        // Online events are forms; offline ones were stored as JSON.
        let form = if item.body.trim_start().starts_with('{') {
            serde_json::from_str(&item.body).unwrap_or(Value::Null)
        } else {
            Value::Object(crate::phpquery::parse(&item.body))
        };
        let ev = api::events::Event::decode(&form);
        let number = ev.number.clone().unwrap_or_default();
        let e164 = call::normalize_phone(&number, country).unwrap_or_else(|_| number.clone());
        let crm = (ev.crm_entity_type.clone(), ev.crm_entity_id);
        let now = ctx.clock.now();
        let outcome = match ev.name.as_str() {
            "ONEXTERNALCALLSTART" => match ev.call_id.as_deref() {
                None => "ignored: no CALL_ID".to_string(),
                Some(call_id) => {
                    let user = ev.user_id;
                    let store = ctx.store.lock();
                    let repeat = match user {
                        Some(u) => store.click_recent(
                            u,
                            &e164,
                            item.received_at - Duration::seconds(DEBOUNCE_SECS),
                        )?,
                        None => false,
                    };
                    let click = Click {
                        key: call_id.to_string(),
                        kind: "click".into(),
                        b24_call_id: Some(call_id.to_string()),
                        user_id: user,
                        inner_line: None,
                        number: e164.clone(),
                        line_number: ev.line_number.clone(),
                        crm_entity_type: crm.0.clone(),
                        crm_entity_id: crm.1,
                        requested_at: item.received_at,
                        // A second click within seconds: its card is closed, nothing rings twice.
                        state: if repeat { "cancelling" } else { "new" }.into(),
                        unitalk_call_id: None,
                        reason: repeat.then(|| "a repeat click within 5 s".to_string()),
                    };
                    if store.click_add(&click, now)? {
                        s.clicks += 1;
                        format!("click {call_id}")
                    } else {
                        format!("ignored: CALL_ID {call_id} seen before")
                    }
                }
            },
            "ONEXTERNALCALLBACKSTART" => {
                if number.is_empty() {
                    "ignored: no PHONE_NUMBER".to_string()
                } else {
                    let key = format!("unitalk-cb-{:016x}", rand::random::<u64>());
                    if let Some(t) = &ev.text {
                        tracing::info!(callback = %key, number = %e164, text = t, "callback request (its whisper text has no Unitalk equivalent and is only logged)");
                    }
                    let click = Click {
                        key: key.clone(),
                        kind: "callback".into(),
                        b24_call_id: None,
                        user_id: None,
                        inner_line: None,
                        number: e164.clone(),
                        line_number: ev.line_number.clone(),
                        crm_entity_type: crm.0.clone(),
                        crm_entity_id: crm.1,
                        requested_at: item.received_at,
                        state: "new".into(),
                        unitalk_call_id: None,
                        reason: None,
                    };
                    ctx.store.lock().click_add(&click, now)?;
                    s.clicks += 1;
                    format!("callback {key}")
                }
            }
            "ONAPPUNINSTALL" => {
                tracing::error!("Bitrix24 says the application was uninstalled from the portal; sync stops until it is installed again");
                ctx.store
                    .lock()
                    .set_fact(FACT_UNINSTALLED, &crate::store::ts(now), now)?;
                "application uninstalled".to_string()
            }
            other => format!("ignored: event {other}"),
        };
        ctx.store.lock().inbox_done(item.id, &outcome, now)?;
    }
    Ok(())
}

/// The inner line of Bitrix24 user `user`: from the operators ubsync knows, else `user.get`.
async fn line_of(ctx: &SyncCtx, user: i64) -> Result<Option<String>, SyncError> {
    let known = ctx
        .store
        .lock()
        .operator_map(ctx.clock.now(), Duration::days(3650))?;
    if let Some((line, _)) = known.iter().find(|(_, u)| **u == Some(Some(user))) {
        return Ok(Some(line.clone()));
    }
    let found = lookup(ctx, vec![api::users::user_by_id("u", user)]).await?;
    Ok(found
        .results
        .get("u")
        .and_then(api::users::first_inner_line))
}

/// Who takes a callback request: the CRM responsible of its number (in `rules.crm_order`),
/// else `webhooks.callback_user_id`, else `bitrix24.default_user_id`.
async fn callback_user(ctx: &SyncCtx, c: &Click) -> Result<Option<i64>, SyncError> {
    let found = lookup(ctx, vec![api::crm::search_entities("s", &c.number)]).await?;
    let mut list = found
        .results
        .get("s")
        .map(api::crm::searched_entities)
        .unwrap_or_default();
    list.sort_by_key(|e| ctx.cfg.rules.crm_rank(&e.entity.kind));
    let crm = list
        .iter()
        .find(|e| c.crm_entity_id.is_none() || Some(e.entity.id) == c.crm_entity_id)
        .or(list.first())
        .map(|e| e.user_id);
    Ok(crm.or(ctx.cfg.webhooks.callback_user_id).or(ctx
        .cfg
        .bitrix24
        .default_user_id
        .map(|u| u as i64)))
}

/// Moves clicks on: new ones ring (callbacks are registered first), failed and expired ones are
/// finished as cancelled.
pub(super) async fn advance(ctx: &SyncCtx, s: &mut PassSummary) -> Result<(), SyncError> {
    if !ctx.cfg.webhooks.bitrix24_events {
        return Ok(());
    }
    let new = ctx.store.lock().clicks_in("new")?;
    for mut c in new {
        let now = ctx.clock.now();
        if c.kind == "callback" {
            let Some(user) = callback_user(ctx, &c).await? else {
                c.state = "cancelled".into();
                c.reason = Some("no operator: the number has no CRM responsible and neither webhooks.callback_user_id nor bitrix24.default_user_id is set".into());
                ctx.store.lock().click_save(&c, now)?;
                continue;
            };
            c.user_id = Some(user);
            if c.b24_call_id.is_none() {
                let register = api::telephony::RegisterCallback {
                    user_id: user,
                    phone: &c.number,
                    start: &crate::timezone::rfc3339_in(now, ctx.cfg.bitrix24.timezone),
                    external_id: &c.key,
                    line_number: c.line_number.as_deref(),
                    entity: c.crm_entity_type.as_deref().zip(c.crm_entity_id),
                }
                .command("cb");
                // A repeat within 30 minutes with the same EXTERNAL_CALL_ID returns the same
                // call: a lost answer is simply asked again next round.
                let out = write_untracked(ctx, vec![register]).await?;
                match out
                    .results
                    .get("cb")
                    .and_then(|r| api::telephony::CallRecord::decode(r).call_id)
                {
                    Some(id) => c.b24_call_id = Some(id),
                    None => {
                        tracing::warn!(callback = %c.key, error = ?out.errors.get("cb").map(|e| &e.description), "the callback could not be registered; trying again");
                        ctx.store.lock().click_save(&c, now)?;
                        continue;
                    }
                }
            }
        }
        let Some(user) = c.user_id else {
            c.state = "cancelling".into();
            c.reason = Some("the event named no user".into());
            ctx.store.lock().click_save(&c, now)?;
            continue;
        };
        let Some(line) = line_of(ctx, user).await? else {
            c.state = "cancelling".into();
            c.reason = Some(format!(
                "Bitrix24 user {user} has no inner line (UF_PHONE_INNER), so Unitalk cannot ring them"
            ));
            ctx.store.lock().click_save(&c, now)?;
            continue;
        };
        // Dialing is recorded before Unitalk is asked: a crash in between never rings twice.
        c.inner_line = Some(line.clone());
        c.state = "dialing".into();
        ctx.store.lock().click_save(&c, now)?;
        let meta = c.b24_call_id.clone().unwrap_or_default();
        match ctx
            .unitalk
            .direct_call(&line, &digits(&c.number), &meta)
            .await
        {
            Ok(()) => {
                tracing::info!(call = %meta, line = %line, number = %c.number, "Unitalk rings the operator, then the client");
                s.clicks_dialed += 1;
            }
            Err(e) => {
                c.state = "cancelling".into();
                c.reason = Some(format!("Unitalk did not place the call: {e}"));
                ctx.store.lock().click_save(&c, ctx.clock.now())?;
            }
        }
    }
    cancel_due(ctx, s).await
}

/// Finishes as cancelled the clicks that failed and those no call claimed within the TTL, and
/// tells their users why.
async fn cancel_due(ctx: &SyncCtx, s: &mut PassSummary) -> Result<(), SyncError> {
    let now = ctx.clock.now();
    let ttl = secs(ctx.cfg.webhooks.click_ttl);
    let mut due = ctx.store.lock().clicks_in("cancelling")?;
    due.extend(
        ctx.store
            .lock()
            .clicks_in("dialing")?
            .into_iter()
            .filter(|c| c.requested_at + ttl <= now)
            .map(|mut c| {
                c.reason = Some(format!(
                    "no Unitalk call from line {} to {} within {} minutes",
                    c.inner_line.as_deref().unwrap_or("?"),
                    c.number,
                    ttl.num_minutes()
                ));
                c
            }),
    );
    if due.is_empty() {
        return Ok(());
    }
    let mut commands = Vec::new();
    for (i, c) in due.iter().enumerate() {
        let (Some(call_id), Some(user)) = (&c.b24_call_id, c.user_id) else {
            continue;
        };
        commands.push(
            api::telephony::Finish {
                call: api::telephony::CallRef::Known(call_id.clone()),
                user_id: user,
                duration: 0,
                status_code: "603-S",
                add_to_chat: false,
                record_url: None,
            }
            .command(format!("x{i}")),
        );
    }
    // Finishing twice changes nothing (only the first finish counts): a lost answer is sent
    // again next round.
    let out = write_untracked(ctx, commands).await?;
    let mut notes = Vec::new();
    for (i, mut c) in due.into_iter().enumerate() {
        let k = format!("x{i}");
        if c.b24_call_id.is_some() && !(out.results.contains_key(&k) || out.errors.contains_key(&k))
        {
            continue;
        }
        let why = c.reason.clone().unwrap_or_default();
        tracing::warn!(click = %c.key, reason = %why, "a click-to-call was cancelled");
        if let Some(u) = c
            .user_id
            .filter(|_| c.state == "cancelling" || c.kind == "click")
        {
            notes.push(api::users::notify(
                format!("m{i}"),
                u,
                &format!("The call to {} could not be placed: {why}", c.number),
                Some(format!("UBSYNC_CLICK_{}", c.key)),
            ));
        }
        c.state = "cancelled".into();
        ctx.store.lock().click_save(&c, now)?;
        s.clicks_cancelled += 1;
    }
    if !notes.is_empty() {
        if let Err(e) = write_untracked(ctx, notes).await {
            tracing::warn!(error = %e, "could not tell users why their calls were cancelled");
        }
    }
    Ok(())
}

/// Lets the outgoing calls that came of clicks claim them: a pending `OUT` call carrying the
/// click's CALL_ID as `meta` (when Unitalk echoes it), else one from the click's line to its
/// number starting between a minute before the click and the TTL after, takes the click's
/// `CALL_ID` (so it is finished, never registered).
pub(super) fn claim(ctx: &SyncCtx, s: &mut PassSummary) -> Result<(), SyncError> {
    if !ctx.cfg.webhooks.bitrix24_events {
        return Ok(());
    }
    let mut dialing = ctx.store.lock().clicks_in("dialing")?;
    if dialing.is_empty() {
        return Ok(());
    }
    let now = ctx.clock.now();
    let ttl = secs(ctx.cfg.webhooks.click_ttl);
    let known = known_lines(ctx)?;
    let items = ctx.store.lock().work_due(now)?;
    for item in items {
        if item.ledger.stage != Stage::Pending || item.ledger.b24_call_id.is_some() {
            continue;
        }
        let Some(f) = stored_facts(ctx, &known, &item.raw) else {
            continue;
        };
        if f.way != call::Way::Out {
            continue;
        }
        // Unitalk echoing `meta` (the CALL_ID given to directCall) makes the match exact.
        let meta = serde_json::from_str::<Value>(&item.raw)
            .ok()
            .and_then(|v| parse(ctx, &v).ok())
            .and_then(|c| c.meta);
        let by_meta = meta.as_ref().and_then(|m| {
            dialing
                .iter()
                .position(|c| c.b24_call_id.as_deref() == Some(m.as_str()))
        });
        let Some(i) = by_meta.or_else(|| {
            dialing.iter().position(|c| {
                c.inner_line.as_deref() == f.operator_line.as_deref()
                    && !digits(&c.number).is_empty()
                    && digits(&c.number) == digits(&f.client_number)
                    && f.started_at >= c.requested_at - Duration::seconds(SKEW_SECS)
                    && f.started_at <= c.requested_at + ttl
            })
        }) else {
            continue;
        };
        let c = dialing.remove(i);
        let mut row = item.ledger.clone();
        row.b24_call_id = c.b24_call_id.clone();
        row.stage = Stage::Registered;
        row.responsible_id = c.user_id;
        tracing::info!(call = %f.id, b24_call = ?c.b24_call_id, "a Unitalk call claims its click-to-call: finished under the click's CALL_ID");
        ctx.store.lock().claim_click(&c, &row, now)?;
        s.clicks_claimed += 1;
        if dialing.is_empty() {
            break;
        }
    }
    Ok(())
}

/// The events bound in the portal (`event.get`): (EVENT, handler; empty for an offline one).
pub async fn bound_events(
    b24: &crate::bitrix24::Bitrix24Client,
) -> Result<Vec<(String, String)>, Bitrix24Error> {
    let (method, params) = api::events::bound();
    let bound = b24.call(method, params).await?;
    Ok(api::events::bindings(&bound.result)
        .into_iter()
        .map(|b| (b.event, b.handler.unwrap_or_default()))
        .collect())
}

/// The events ubsync handles.
pub const EVENTS: &[&str] = &[
    "ONEXTERNALCALLSTART",
    "ONEXTERNALCALLBACKSTART",
    "ONAPPUNINSTALL",
];

/// Binds the telephony events to `webhooks.bitrix24_handler`, idempotently (`event.get` first):
/// handlers vanish when the application is updated or reinstalled, so this runs whenever the
/// daemon starts. Returns the events newly bound.
pub async fn bind_events(ctx: &SyncCtx) -> Result<Vec<String>, SyncError> {
    let offline = ctx.cfg.webhooks.bitrix24_offline;
    let handler = match ctx.cfg.webhooks.bitrix24_handler.as_ref() {
        _ if offline => String::new(),
        Some(u) => u.to_string(),
        None => return Ok(Vec::new()),
    };
    let have = bound_events(&ctx.b24).await?;
    let mut added = Vec::new();
    for ev in EVENTS {
        if have.iter().any(|(e, h)| e == ev && *h == handler) {
            continue;
        }
        let (method, params) = api::events::bind(ev, (!offline).then_some(handler.as_str()));
        ctx.b24.call(method, params).await?;
        added.push(ev.to_string());
    }
    Ok(added)
}

/// The portal fact caching `feature.get rest_offline_extended`.
const FACT_OFFLINE_EXTENDED: &str = "bitrix24.rest_offline_extended";

/// Most `event.offline.get` pages read per poll.
const OFFLINE_PAGES: usize = 10;

/// The offline route: reads `event.offline.get` into the inbox. Where the plan has the
/// reserve-then-confirm mode (`feature.get rest_offline_extended`), events are reserved
/// (`clear=0`) under ubsync's own `process_id` (kept in the state), stored, then cleared: a
/// reserving get whose answer was lost gives the same events again at the next poll, and a
/// clear whose answer was lost is sent again first. Elsewhere they are removed as they are read
/// (`clear=1`); a crash between the read and the store loses those (logged).
/// Returns how many events were stored.
pub async fn poll_offline(ctx: &SyncCtx) -> Result<u64, SyncError> {
    if !(ctx.cfg.webhooks.bitrix24_events && ctx.cfg.webhooks.bitrix24_offline) {
        return Ok(0);
    }
    let cached = ctx.store.lock().fact(FACT_OFFLINE_EXTENDED)?;
    let extended = match cached {
        Some(v) => v == "Y",
        None => {
            let (method, params) = api::events::feature("rest_offline_extended");
            let on = api::events::feature_on(&ctx.b24.call(method, params).await?.result);
            let now = ctx.clock.now();
            ctx.store
                .lock()
                .set_fact(FACT_OFFLINE_EXTENDED, if on { "Y" } else { "N" }, now)?;
            if !on {
                tracing::warn!("this plan has no reserve-then-confirm offline events: each is removed as it is read, so one read just before a crash is lost");
            }
            on
        }
    };
    let mut stored = 0;
    let process = if extended {
        Some(offline_process_id(ctx)?)
    } else {
        None
    };
    // A clear whose answer was lost is sent again before anything else.
    // Until it goes, the stored events would come back with the next reserving get.
    if let Some(process) = &process {
        if let Err(e) = send_owed_clear(ctx, process).await {
            tracing::warn!(error = %e, "the owed event.offline.clear failed; trying again at the next poll");
            return Ok(0);
        }
    }
    for _ in 0..OFFLINE_PAGES {
        let (method, params) = match &process {
            Some(p) => api::events::offline_reserve(p, 50),
            None => api::events::offline_get(true, 50),
        };
        let env = ctx.b24.call(method, params).await?;
        let (answered, events) = api::events::offline_events(&env.result);
        if let (Some(ours), Some(theirs)) = (&process, &answered) {
            if ours != theirs {
                tracing::warn!("the portal reserved offline events under another process_id than ubsync's; a lost answer could hide them until they expire");
            }
        }
        let now = ctx.clock.now();
        let ids: Vec<String> = events.iter().filter_map(|e| e.id.clone()).collect();
        {
            // The events and the clear they await are stored together: a crash after this
            // leaves them in the inbox and the clear to be sent again.
            let store = ctx.store.lock();
            for e in &events {
                store.inbox_add(
                    "bitrix24",
                    &e.stored_form().to_string(),
                    Some("application/json"),
                    now,
                )?;
                stored += 1;
            }
            if process.is_some() && !ids.is_empty() {
                store.set_fact(
                    FACT_OFFLINE_TO_CLEAR,
                    &serde_json::to_string(&ids).unwrap_or_default(),
                    now,
                )?;
            }
        }
        if let Some(process) = answered.as_ref().or(process.as_ref()).filter(|_| extended) {
            if !ids.is_empty() {
                if let Err(e) = send_owed_clear(ctx, process).await {
                    // The events are stored: the clear is owed and goes first next time.
                    tracing::warn!(error = %e, "event.offline.clear failed; it is sent again at the next poll");
                    break;
                }
            }
        }
        if events.len() < 50 {
            break;
        }
    }
    Ok(stored)
}

/// The portal fact naming ubsync's own offline `process_id` (made once, kept for good).
const FACT_OFFLINE_PROCESS: &str = "bitrix24.offline_process_id";

/// The ids of offline events stored in the inbox whose `event.offline.clear` has not been
/// answered yet (a JSON list).
const FACT_OFFLINE_TO_CLEAR: &str = "bitrix24.offline_to_clear";

/// ubsync's offline `process_id`: made and stored before the first reserving get, so a get
/// whose answer is lost reserves under an id the next poll knows.
fn offline_process_id(ctx: &SyncCtx) -> Result<String, SyncError> {
    let store = ctx.store.lock();
    if let Some(p) = store.fact(FACT_OFFLINE_PROCESS)? {
        return Ok(p);
    }
    let p = format!("ubsync{:032x}", rand::random::<u128>());
    store.set_fact(FACT_OFFLINE_PROCESS, &p, ctx.clock.now())?;
    Ok(p)
}

/// Sends the clear owed for events already in the inbox (if any) and forgets it once the portal
/// answers; a clear whose answer is lost is simply sent again (clearing twice is harmless).
async fn send_owed_clear(ctx: &SyncCtx, process: &str) -> Result<(), SyncError> {
    let owed = ctx.store.lock().fact(FACT_OFFLINE_TO_CLEAR)?;
    let ids: Vec<String> = owed
        .as_deref()
        .and_then(|o| serde_json::from_str(o).ok())
        .unwrap_or_default();
    if ids.is_empty() {
        return Ok(());
    }
    let (method, params) = api::events::offline_clear(process, &ids);
    ctx.b24.call(method, params).await?;
    ctx.store
        .lock()
        .set_fact(FACT_OFFLINE_TO_CLEAR, "[]", ctx.clock.now())?;
    Ok(())
}
