//! One open missed-call task per client: a later missed call from the same client is folded
//! into the open task (its description lists every call), and an answered call with the client
//! completes it. Both writes are idempotent (the description is rebuilt whole from the ledger;
//! completing a completed task changes nothing), so a lost answer is sent again, never probed.

use super::*;
use crate::store::client_tasks::ClientTask;

/// How long after ubsync first saw its call an open task is watched for the call-back that
/// completes it.
const WATCH_DAYS: i64 = 30;

/// The stored facts of a task's calls, the owner first.
fn task_facts(
    ctx: &SyncCtx,
    known: &HashSet<String>,
    t: &ClientTask,
) -> Option<(CallFacts, Vec<CallFacts>)> {
    let mut all = t
        .calls
        .iter()
        .map(|(_, raw, _)| stored_facts(ctx, known, raw))
        .collect::<Option<Vec<_>>>()?;
    if all.is_empty() {
        return None;
    }
    let owner = all.remove(0);
    Some((owner, all))
}

/// The CRM entity a client task is bound to (recorded on its own call).
fn owner_entity(t: &ClientTask) -> Option<Entity> {
    Some(Entity {
        kind: t.owner.crm_entity_type.clone()?,
        id: t.owner.crm_entity_id?,
    })
}

/// Folds missed calls into their client's open task.
pub(super) async fn push_followups(
    ctx: &SyncCtx,
    opts: &PassOptions,
    s: &mut PassSummary,
    followups: Vec<(Due, ClientTask)>,
) -> Result<(), SyncError> {
    if followups.is_empty() {
        return Ok(());
    }
    let known = known_lines(ctx)?;
    let mut plans = Vec::new();
    for (d, t) in &followups {
        let Some((owner, mut again)) = task_facts(ctx, &known, t) else {
            tracing::warn!(call = %d.facts.id, task = t.task_id, "the open task's calls could not be read again; the call gets its own task");
            continue;
        };
        again.push(d.facts.clone());
        again.sort_by_key(|f| f.started_at);
        let reached = None;
        let text =
            plan::folded_description(&ctx.cfg, &owner, owner_entity(t).as_ref(), &again, reached);
        plans.push(Chain {
            plan: CallPlan {
                call_id: d.facts.id.clone(),
                commands: vec![plan::task_update_description(
                    t.task_id,
                    key("f", &d.facts.id),
                    text,
                )],
            },
            row: d.item.ledger.clone(),
            non_idempotent: false,
        });
    }
    if opts.dry_run {
        s.plan
            .extend(plans.iter().flat_map(|c| describe_plan(&c.plan)));
        return Ok(());
    }
    let targets: HashMap<String, (i64, Option<i64>, CallFacts, String)> = followups
        .iter()
        .map(|(d, t)| {
            (
                d.facts.id.clone(),
                (
                    t.task_id,
                    t.owner.responsible_id,
                    d.facts.clone(),
                    d.item.content_hash.clone(),
                ),
            )
        })
        .collect();
    let cfg = &ctx.cfg;
    let mut folded = 0;
    send_plans(
        ctx,
        plans,
        |id, mut l, out| {
            let (task_id, responsible, f, hash) = &targets[id];
            let k = key("f", id);
            l.task_comment = true;
            if out.results.contains_key(&k) {
                l.task_id = Some(*task_id);
                l.responsible_id = *responsible;
                folded += 1;
                return (plan::settle_stage(cfg, f, l, hash), None);
            }
            if let Some(e) = out.errors.get(&k) {
                // The task is gone or closed to ubsync: this call gets a task of its own.
                tracing::warn!(call = %id, task = task_id, error = %e.description, "the client's open task could not be updated; the call gets its own task");
                l.task_id = None;
                return (l, None);
            }
            (l, None)
        },
        s,
    )
    .await?;
    s.tasks_folded += folded;
    Ok(())
}

/// Completes open tasks whose client was reached after the latest missed call in them.
pub(super) async fn close_reached(
    ctx: &SyncCtx,
    opts: &PassOptions,
    s: &mut PassSummary,
) -> Result<(), SyncError> {
    let cfg = &ctx.cfg;
    if !cfg.tasks.enabled || !cfg.tasks.close_on_callback {
        return Ok(());
    }
    let now = ctx.clock.now();
    let known = known_lines(ctx)?;
    let mut plans = Vec::new();
    let mut by = HashMap::new();
    {
        let store = ctx.store.lock();
        for t in store.open_client_tasks(now - Duration::days(WATCH_DAYS))? {
            let Some(client) = t.owner.client.clone() else {
                continue;
            };
            let Some((reacher, raw)) = store.reached_after(&client, t.last_missed())? else {
                continue;
            };
            let (Some((owner, again)), Some(b)) =
                (task_facts(ctx, &known, &t), stored_facts(ctx, &known, &raw))
            else {
                continue;
            };
            let text =
                plan::folded_description(cfg, &owner, owner_entity(&t).as_ref(), &again, Some(&b));
            let id = t.owner.call_id.clone();
            plans.push(Chain {
                plan: CallPlan {
                    call_id: id.clone(),
                    commands: vec![
                        plan::task_update_description(t.task_id, key("d", &id), text),
                        plan::task_complete(t.task_id, key("k", &id)),
                    ],
                },
                row: t.owner.clone(),
                non_idempotent: false,
            });
            by.insert(id, reacher);
        }
    }
    if plans.is_empty() {
        return Ok(());
    }
    if opts.dry_run {
        s.plan
            .extend(plans.iter().flat_map(|c| describe_plan(&c.plan)));
        return Ok(());
    }
    let mut closed = 0;
    send_plans(
        ctx,
        plans,
        |id, mut l, out| {
            let k = key("k", id);
            if out.results.contains_key(&k) || out.errors.contains_key(&k) {
                if let Some(e) = out.errors.get(&k) {
                    // A task deleted or completed by hand: nothing is left to complete.
                    tracing::warn!(call = %id, task = ?l.task_id, error = %e.description, "the client's task could not be completed; it is no longer watched");
                }
                l.task_closed_at = Some(now);
                l.task_closed_by = by.get(id).cloned();
                closed += 1;
            }
            (l, None)
        },
        s,
    )
    .await?;
    s.tasks_closed += closed;
    Ok(())
}
