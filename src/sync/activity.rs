//! Activity mode: CRM lookups (`crm.duplicate.findbycomm`, entity responsibles), leads, and
//! `crm.activity.add`/`update` per call.

use super::*;

/// Looks numbers up with `crm.duplicate.findbycomm` (20 per command) and returns the best
/// entity per number: a contact, else a company, else a lead (lowest id first).
pub(super) async fn find_entities(
    ctx: &SyncCtx,
    numbers: &[String],
) -> Result<HashMap<String, Entity>, SyncError> {
    // Entities found within `sync.crm_cache` are not asked for again.
    let now = ctx.clock.now();
    let hits = ctx
        .store
        .lock()
        .crm_hits(numbers, now, secs(ctx.cfg.sync.crm_cache))?;
    let mut out: HashMap<String, Entity> = hits
        .iter()
        .map(|(n, h)| {
            (
                n.clone(),
                Entity {
                    kind: h.kind.clone(),
                    id: h.id,
                },
            )
        })
        .collect();
    let ask: Vec<String> = numbers
        .iter()
        .filter(|n| !out.contains_key(*n))
        .cloned()
        .collect();
    let numbers = &ask[..];
    let chunks: Vec<&[String]> = numbers.chunks(20).collect();
    for (ci, chunk) in chunks.iter().enumerate() {
        // One number per entity type is ambiguous across a chunk; ask per number in the chunk.
        let commands: Vec<Command> = chunk
            .iter()
            .enumerate()
            .map(|(i, n)| api::crm::find_by_phone(format!("d{ci}_{i}"), n))
            .collect();
        let found = lookup(ctx, commands).await?;
        for (i, n) in chunk.iter().enumerate() {
            let Some(found) = found.results.get(&format!("d{ci}_{i}")) else {
                continue;
            };
            let found = api::crm::found_by_phone(found);
            for kind in &ctx.cfg.rules.crm_order {
                let kind = kind.as_str();
                let id = found
                    .iter()
                    .find(|(k, _)| k == kind)
                    .and_then(|(_, ids)| ids.iter().copied().min());
                if let Some(id) = id {
                    out.insert(
                        n.clone(),
                        Entity {
                            kind: kind.into(),
                            id,
                        },
                    );
                    break;
                }
            }
        }
    }
    let found: Vec<(String, crate::store::crm::CrmHit)> = ask
        .iter()
        .filter_map(|n| {
            out.get(n).map(|e| {
                (
                    n.clone(),
                    crate::store::crm::CrmHit {
                        kind: e.kind.clone(),
                        id: e.id,
                        responsible: None,
                    },
                )
            })
        })
        .collect();
    if !found.is_empty() {
        ctx.store.lock().remember_crm(&found, now)?;
    }
    Ok(out)
}

pub(super) async fn push_activity(
    ctx: &SyncCtx,
    opts: &PassOptions,
    s: &mut PassSummary,
    due: Vec<Due>,
    users: &HashMap<String, i64>,
) -> Result<(), SyncError> {
    let cfg = &ctx.cfg;
    let now = ctx.clock.now();
    // Follow-ups first: a recording link that appeared after the activity was written.
    let mut updates = Vec::new();
    let mut fresh = Vec::new();
    let mut unassigned = Vec::new();
    for d in due {
        match d.item.ledger.stage {
            Stage::Pending => match user_for(&ctx.cfg, &d.facts, users) {
                Some(_) => fresh.push(d),
                None => unassigned.push(d),
            },
            _ if plan::needs_recording(&d.facts, &d.item.ledger)
                || plan::needs_activity_refresh(cfg, &d.item.ledger, &d.item.content_hash) =>
            {
                if let Some(c) =
                    plan::activity_update(cfg, &d.facts, &d.item.ledger, operator_name(&d.facts))
                {
                    updates.push((d, c));
                }
            }
            _ => {}
        }
    }
    settle_unassigned(ctx, opts, s, unassigned, now)?;

    let mut numbers: Vec<String> = fresh
        .iter()
        .map(|d| d.facts.client_number.clone())
        .collect();
    numbers.sort();
    numbers.dedup();
    let mut entities = find_entities(ctx, &numbers).await?;

    // Unknown numbers: one lead per number, created before any activity refers to it.
    let unknown: Vec<String> = numbers
        .iter()
        .filter(|n| !entities.contains_key(*n))
        .cloned()
        .collect();
    // The first call of each unknown number whose direction may create a lead.
    let leads = &cfg.rules.leads;
    let first_call: HashMap<&String, &Due> = fresh
        .iter()
        .rev()
        .filter(|d| leads.create.allows(d.facts.way))
        .map(|d| (&d.facts.client_number, d))
        .collect();
    let unknown: Vec<String> = unknown
        .into_iter()
        .filter(|n| first_call.contains_key(n))
        .collect();
    if !unknown.is_empty() {
        let tz = cfg.bitrix24.timezone;
        let commands: Vec<Command> = unknown
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let d = first_call[n];
                let assigned = user_for(&ctx.cfg, &d.facts, users).unwrap_or(1);
                let values = crate::rules::values(&d.facts, tz, operator_name(&d.facts), None);
                api::crm::NewLead {
                    title: leads.title.render(&values),
                    phone: n,
                    source: &leads.source,
                    assigned,
                    origin_id: &d.facts.external_id,
                    extra: crate::rules::Fields::render(&cfg.rules.fields.lead, &values),
                }
                .command(format!("l{i}"))
            })
            .collect();
        if opts.dry_run {
            s.plan.extend(
                commands
                    .iter()
                    .map(|c| format!("lead for {:?}: {}", api::crm::lead_title(c), c.encode())),
            );
        } else {
            let out = write_untracked(ctx, commands).await?;
            for (i, n) in unknown.iter().enumerate() {
                match out.results.get(&format!("l{i}")).and_then(as_i64) {
                    Some(id) => {
                        s.leads += 1;
                        let hit = crate::store::crm::CrmHit {
                            kind: "LEAD".into(),
                            id,
                            responsible: None,
                        };
                        ctx.store
                            .lock()
                            .remember_crm(&[(n.clone(), hit)], ctx.clock.now())?;
                        entities.insert(
                            n.clone(),
                            Entity {
                                kind: "LEAD".into(),
                                id,
                            },
                        );
                    }
                    None => {
                        tracing::warn!(number = %n, error = ?out.errors.get(&format!("l{i}")), "lead creation failed; the calls wait for the next pass")
                    }
                }
            }
        }
    }

    let planned = push_plan::plan_activity(cfg, fresh, &entities, users);
    let (plans, facts, skipped) = (planned.chains, planned.facts, planned.skips);
    settle_quarantines(ctx, opts, s, planned.quarantines, now)?;
    if opts.dry_run {
        s.plan
            .extend(plans.iter().flat_map(|c| describe_plan(&c.plan)));
        s.plan.extend(
            updates
                .iter()
                .map(|(d, c)| format!("call {}: {}", d.facts.id, c.encode())),
        );
        s.plan.extend(missed_task_lines(ctx, &facts));
        return Ok(());
    }
    if !skipped.is_empty() {
        s.skipped += skipped.len() as u64;
        ctx.store.lock().apply(&skipped, &[], None, now)?;
    }
    let mut pushed = 0;
    send_plans(
        ctx,
        plans,
        |id, l, out| {
            let (f, hash) = &facts[id];
            let (row, reason) = plan::record_activity(cfg, f, l, out, hash, now);
            if matches!(row.stage, Stage::Finished | Stage::Done) {
                pushed += 1;
            }
            (row, reason)
        },
        s,
    )
    .await?;
    s.pushed += pushed;

    let upd_facts: HashMap<String, (CallFacts, String)> = updates
        .iter()
        .map(|(d, _)| {
            (
                d.facts.id.clone(),
                (d.facts.clone(), d.item.content_hash.clone()),
            )
        })
        .collect();
    let upd_plans = updates
        .into_iter()
        .map(|(d, c)| Chain {
            plan: CallPlan {
                call_id: d.facts.id.clone(),
                commands: vec![c],
            },
            row: d.item.ledger,
            non_idempotent: false,
        })
        .collect();
    let mut recordings = 0;
    send_plans(
        ctx,
        upd_plans,
        |id, l, out| {
            let (f, hash) = &upd_facts[id];
            let (row, reason) = plan::record_activity_update(cfg, f, l, out, hash, now);
            if f.link.is_some() && row.record_url == f.link && row.stage != Stage::Quarantined {
                recordings += 1;
            }
            (row, reason)
        },
        s,
    )
    .await?;
    s.recordings += recordings;
    Ok(())
}

/// Responsible users of CRM entities: by (kind, id), by number, and whether every lookup got
/// an answer (a result or an error for its command); without one, a missing responsible is not
/// proof that there is none.
pub(super) async fn entity_responsibles(
    ctx: &SyncCtx,
    entities: &[Entity],
    numbers: &[String],
) -> Result<Responsibles, SyncError> {
    let mut complete = true;
    let mut by_entity = HashMap::new();
    let mut by_number = HashMap::new();
    match ctx.cfg.bitrix24.mode {
        Mode::Telephony => {
            // Numbers whose entity and responsible were found within `sync.crm_cache`.
            let now = ctx.clock.now();
            let hits = ctx
                .store
                .lock()
                .crm_hits(numbers, now, secs(ctx.cfg.sync.crm_cache))?;
            for (n, h) in &hits {
                if let Some(resp) = h.responsible {
                    by_entity.insert((h.kind.clone(), h.id), resp);
                    by_number.insert(
                        n.clone(),
                        (
                            Entity {
                                kind: h.kind.clone(),
                                id: h.id,
                            },
                            resp,
                        ),
                    );
                }
            }
            let numbers: Vec<String> = numbers
                .iter()
                .filter(|n| !by_number.contains_key(*n))
                .cloned()
                .collect();
            let commands: Vec<Command> = numbers
                .iter()
                .enumerate()
                .map(|(i, n)| api::crm::search_entities(format!("s{i}"), n))
                .collect();
            let found = lookup(ctx, commands).await?;
            complete &= found.answers_all((0..numbers.len()).map(|i| format!("s{i}")));
            for (i, n) in numbers.iter().enumerate() {
                let Some(list) = found.results.get(&format!("s{i}")) else {
                    continue;
                };
                // The configured type order decides between entities of one number.
                let mut list = api::crm::searched_entities(list);
                list.sort_by_key(|e| ctx.cfg.rules.crm_rank(&e.entity.kind));
                for e in list {
                    by_entity.insert((e.entity.kind.clone(), e.entity.id), e.user_id);
                    by_number.entry(n.clone()).or_insert((e.entity, e.user_id));
                }
            }
            let found: Vec<(String, crate::store::crm::CrmHit)> = numbers
                .iter()
                .filter_map(|n| {
                    by_number.get(n).map(|(e, r)| {
                        (
                            n.clone(),
                            crate::store::crm::CrmHit {
                                kind: e.kind.clone(),
                                id: e.id,
                                responsible: Some(*r),
                            },
                        )
                    })
                })
                .collect();
            if !found.is_empty() {
                ctx.store.lock().remember_crm(&found, now)?;
            }
        }
        Mode::Activity => {
            let mut commands = Vec::new();
            for kind in ["CONTACT", "LEAD", "COMPANY"] {
                let ids: Vec<i64> = entities
                    .iter()
                    .filter(|e| e.kind == kind)
                    .map(|e| e.id)
                    .collect();
                for (ci, chunk) in ids.chunks(50).enumerate() {
                    commands.push(api::crm::entities_by_id(
                        format!("e_{}_{ci}", kind.to_lowercase()),
                        kind,
                        chunk,
                    ));
                }
            }
            let keys: Vec<(String, String)> = commands
                .iter()
                .map(|c| (c.key.clone(), c.method.clone()))
                .collect();
            let found = lookup(ctx, commands).await?;
            complete &= found.answers_all(keys.iter().map(|(k, _)| k.clone()));
            for (k, method) in keys {
                let kind = api::crm::listed_kind(&method);
                let Some(list) = found.results.get(&k) else {
                    continue;
                };
                for (id, resp) in api::crm::listed_responsibles(list) {
                    by_entity.insert((kind.clone(), id), resp);
                }
            }
        }
    }
    Ok((by_entity, by_number, complete))
}

/// Responsibles by (kind, id), by number, and whether every lookup was answered.
pub(super) type Responsibles = (
    HashMap<(String, i64), i64>,
    HashMap<String, (Entity, i64)>,
    bool,
);
