//! Gather: the due work classified once (skip rules and the script's filter applied to calls
//! not pushed yet, unreadable ones quarantined) and the read-only lookups it needs (the
//! operators' Bitrix24 users).

use super::*;

/// Classifies due work; calls that are skipped or cannot be pushed are settled right away.
pub(super) fn understand(
    ctx: &SyncCtx,
    items: Vec<WorkItem>,
    s: &mut PassSummary,
    dry_run: bool,
) -> Result<Vec<Due>, SyncError> {
    let now = ctx.clock.now();
    let known = known_lines(ctx)?;
    let mut due = Vec::new();
    let mut settled = Vec::new();
    let mut quarantine = Vec::new();
    for item in items {
        let raw: Value = serde_json::from_str(&item.raw).unwrap_or(Value::Null);
        let call = match parse(ctx, &raw) {
            Ok(c) => c,
            Err(e) => {
                let (l, q) = quarantine_item(&item, "unitalk", e.reason);
                quarantine.push(q);
                settled.push(l);
                continue;
            }
        };
        match classify(&call, &known, &ctx.cfg.sync, &ctx.cfg.rules) {
            // A skip filter holds back calls not pushed yet; one already in Bitrix24 is followed
            // up as before (a card is never left hanging by a rule added later).
            Disposition::Push(facts) if item.ledger.stage == Stage::Pending => {
                let by_script = match &ctx.cfg.rules.script {
                    Some(script) => {
                        match script.filter(&crate::rules::script::call_map(&facts, Some(&raw))) {
                            Ok(r) => r,
                            Err(e) => {
                                let (l, q) = quarantine_item(&item, "unitalk", e);
                                quarantine.push(q);
                                settled.push(l);
                                continue;
                            }
                        }
                    }
                    None => None,
                };
                let why = by_script
                    .map(|r| format!("the rules script: {r}"))
                    .or_else(|| {
                        ctx.cfg
                            .rules
                            .skip(&facts)
                            .map(|r| format!("rule \"{r}\" (rules.skip)"))
                    });
                match why {
                    Some(why) => {
                        let mut l = item.ledger.clone();
                        l.stage = Stage::Skipped;
                        l.reason = Some(format!("skipped by {why}"));
                        if dry_run {
                            s.plan
                                .push(format!("call {}: not pushed ({why})", facts.id));
                        }
                        s.skipped += 1;
                        settled.push(l);
                    }
                    None => due.push(Due {
                        item,
                        facts: *facts,
                    }),
                }
            }
            Disposition::Push(facts) => due.push(Due {
                item,
                facts: *facts,
            }),
            Disposition::NotFinal
                if call.started_at > now - Duration::hours(DIALING_HOLD_HOURS) => {}
            Disposition::NotFinal => {
                let reason = format!("still DIALING {DIALING_HOLD_HOURS} hours after it started");
                let (l, q) = quarantine_item(&item, "unitalk", reason);
                quarantine.push(q);
                settled.push(l);
            }
            Disposition::Skip(reason) if item.ledger.stage == Stage::Pending => {
                let mut l = item.ledger.clone();
                l.stage = Stage::Skipped;
                l.reason = Some(reason);
                s.skipped += 1;
                settled.push(l);
            }
            Disposition::Skip(_) => {}
            Disposition::Quarantine(reason) => {
                let (l, q) = quarantine_item(&item, "unitalk", reason);
                quarantine.push(q);
                settled.push(l);
            }
        }
    }
    s.quarantined += quarantine.len() as u64;
    if !(settled.is_empty() && quarantine.is_empty()) {
        ctx.store.lock().apply(&settled, &quarantine, None, now)?;
    }
    Ok(due)
}

/// Resolves the Bitrix24 user of each operator line (cached for a day): line → user, and the
/// lines whose lookup got no answer (their calls wait: never the default user by mistake).
pub(super) async fn resolve_operators(
    ctx: &SyncCtx,
    lines: &HashSet<String>,
) -> Result<(HashMap<String, i64>, HashSet<String>), SyncError> {
    let now = ctx.clock.now();
    let cached = ctx
        .store
        .lock()
        .operator_map(now, Duration::hours(OPERATOR_CACHE_HOURS))?;
    let mut out: HashMap<String, i64> = cached
        .iter()
        .filter_map(|(l, u)| u.flatten().map(|u| (l.clone(), u)))
        .collect();
    let missing: Vec<&String> = lines
        .iter()
        .filter(|l| !matches!(cached.get(*l), Some(Some(_))))
        .collect();
    if missing.is_empty() {
        return Ok((out, HashSet::new()));
    }
    let commands: Vec<Command> = missing
        .iter()
        .enumerate()
        .map(|(i, line)| api::users::user_by_inner_line(format!("u{i}"), line))
        .collect();
    let found = lookup(ctx, commands).await?;
    let store = ctx.store.lock();
    let mut unresolved = HashSet::new();
    for (i, line) in missing.iter().enumerate() {
        let Some(res) = found.results.get(&format!("u{i}")) else {
            unresolved.insert((*line).clone());
            continue;
        };
        let user = api::users::first_user_id(res);
        store.set_operator_user(line, user, now)?;
        if let Some(u) = user {
            out.insert((*line).clone(), u);
        }
    }
    Ok((out, unresolved))
}

/// The Bitrix24 user a call belongs to: the first of `rules.responsible.order` (the CRM left
/// out: a call belongs to who took it) with a user; by default its operator's, else the default.
pub(super) fn user_for(cfg: &Config, f: &CallFacts, users: &HashMap<String, i64>) -> Option<i64> {
    cfg.rules.responsible.pick(
        f,
        None,
        f.operator_line.as_ref().and_then(|l| users.get(l).copied()),
        cfg.bitrix24.default_user_id.map(|u| u as i64),
    )
}

pub(super) fn no_user_reason(f: &CallFacts) -> String {
    format!(
        "no Bitrix24 user for inner line {} (no active user has it as UF_PHONE_INNER) and bitrix24.default_user_id is not set",
        f.operator_line.as_deref().unwrap_or("(none)")
    )
}

pub(super) fn operator_name(f: &CallFacts) -> Option<&str> {
    f.operator_line.as_deref()
}
