//! Missed-call tasks: the responsible user, then `tasks.task.add`, marked in flight first.

use super::*;

/// Creates the follow-up task of every missed incoming call that is in Bitrix24 and has none.
/// Responsible: the matched CRM entity's responsible user, else the operator of the line that
/// rang, else `bitrix24.default_user_id`.
pub(super) async fn push_tasks(
    ctx: &SyncCtx,
    opts: &PassOptions,
    s: &mut PassSummary,
    users: &HashMap<String, i64>,
) -> Result<(), SyncError> {
    let cfg = &ctx.cfg;
    let now = ctx.clock.now();
    let items = ctx.store.lock().work_due(now)?;
    let known = known_lines(ctx)?;
    let mut due = Vec::new();
    for item in items {
        if !matches!(item.ledger.stage, Stage::Finished)
            || item.ledger.task_id.is_some()
            || item.ledger.task_in_flight_since.is_some()
        {
            continue;
        }
        if let Some(f) =
            stored_facts(ctx, &known, &item.raw).filter(|f| plan::needs_task(cfg, f, &item.ledger))
        {
            due.push(Due { item, facts: f });
        }
    }
    if due.is_empty() {
        return Ok(());
    }
    let entities: Vec<Entity> = due
        .iter()
        .filter_map(|d| {
            Some(Entity {
                kind: d.item.ledger.crm_entity_type.clone()?,
                id: d.item.ledger.crm_entity_id?,
            })
        })
        .collect();
    let mut numbers: Vec<String> = due.iter().map(|d| d.facts.client_number.clone()).collect();
    numbers.sort();
    numbers.dedup();
    let (by_entity, by_number, complete) = entity_responsibles(ctx, &entities, &numbers).await?;
    if !complete {
        // A task given to the operator or the default user because the CRM lookup went
        // unanswered would be a task for the wrong manager: the tasks wait for the next round.
        tracing::warn!(
            "Bitrix24 did not answer every CRM responsible lookup; missed-call tasks wait"
        );
        s.faults_survived += 1;
        return Ok(());
    }
    let mut plans = Vec::new();
    let mut facts: HashMap<String, (CallFacts, String)> = HashMap::new();
    let mut unassigned = Vec::new();
    for d in due {
        let l = &d.item.ledger;
        let ledger_entity = l
            .crm_entity_type
            .clone()
            .zip(l.crm_entity_id)
            .map(|(kind, id)| Entity { kind, id });
        let entity = ledger_entity.clone().or_else(|| {
            by_number
                .get(&d.facts.client_number)
                .map(|(e, _)| e.clone())
        });
        let responsible = ledger_entity
            .as_ref()
            .and_then(|e| by_entity.get(&(e.kind.clone(), e.id)).copied())
            .or_else(|| by_number.get(&d.facts.client_number).map(|(_, r)| *r))
            .or_else(|| {
                d.facts
                    .operator_line
                    .as_ref()
                    .and_then(|line| users.get(line).copied())
            })
            .or(cfg.bitrix24.default_user_id.map(|u| u as i64));
        let Some(responsible) = responsible else {
            unassigned.push(d);
            continue;
        };
        let mut l = l.clone();
        l.responsible_id = Some(responsible);
        let command = plan::task_add(
            cfg,
            &d.facts,
            responsible,
            entity.as_ref(),
            operator_name(&d.facts),
        );
        facts.insert(
            d.facts.id.clone(),
            (d.facts.clone(), d.item.content_hash.clone()),
        );
        plans.push((
            CallPlan {
                call_id: d.facts.id.clone(),
                commands: vec![command],
            },
            l,
        ));
    }
    settle_unassigned(ctx, s, unassigned, now)?;
    if opts.dry_run {
        s.plan
            .extend(plans.iter().flat_map(|(p, _)| describe_plan(p)));
        return Ok(());
    }
    // Tasks are not idempotent: each is marked in flight with its responsible user first, so a
    // pass that dies before recording can find it again instead of adding a second one.
    let marked: Vec<(CallPlan, LedgerRow, bool)> = plans
        .into_iter()
        .map(|(p, mut l)| {
            l.task_in_flight_since = Some(now);
            (p, l, false)
        })
        .collect();
    let mut tasks = 0;
    send_plans(
        ctx,
        marked,
        |id, l, out| {
            let (f, hash) = &facts[id];
            let (row, reason) = plan::record_task(cfg, f, l, out, hash, now);
            if row.task_id.is_some() {
                tasks += 1;
            }
            (row, reason)
        },
        s,
    )
    .await?;
    s.tasks += tasks;
    Ok(())
}
