//! Missed-call tasks: the responsible user, then `tasks.task.add`, marked in flight first.

use super::*;
use crate::store::client_tasks::ClientTask;

/// Most task rounds a push makes: a client's later missed calls wait for the task their first
/// one creates, then are folded into it in the next round.
const TASK_ROUNDS: usize = 8;

/// Creates the follow-up task of every missed incoming call that is in Bitrix24 and has none,
/// folds repeat calls into their client's open task, and completes tasks whose client was
/// reached. Responsible: the first of `rules.responsible.order` with a user (by default the
/// matched CRM entity's responsible, the operator of the line that rang, the company line's
/// or the group's user, `bitrix24.default_user_id`).
pub(super) async fn push_tasks(
    ctx: &SyncCtx,
    opts: &PassOptions,
    s: &mut PassSummary,
    users: &HashMap<String, i64>,
) -> Result<(), SyncError> {
    for _ in 0..TASK_ROUNDS {
        let before = (s.tasks, s.tasks_folded);
        let deferred = task_round(ctx, opts, s, users).await?;
        if deferred == 0 || opts.dry_run || (s.tasks, s.tasks_folded) == before {
            break;
        }
    }
    notify::notify_missed(ctx, opts, s).await?;
    client_tasks::close_reached(ctx, opts, s).await
}

/// One task round; returns how many calls wait for another call of their client.
async fn task_round(
    ctx: &SyncCtx,
    opts: &PassOptions,
    s: &mut PassSummary,
    users: &HashMap<String, i64>,
) -> Result<usize, SyncError> {
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
        if let Some(f) = stored_facts(ctx, &known, &item.raw)
            .filter(|f| plan::needs_task(cfg, f, &item.ledger) && plan::task_due_at(cfg, f) <= now)
        {
            due.push(Due { item, facts: f });
        }
    }
    let due = decide(ctx, opts, s, due)?;
    let deferred = due.deferred;
    if !due.followups.is_empty() {
        client_tasks::push_followups(ctx, opts, s, due.followups).await?;
    }
    let due = due.own;
    if due.is_empty() {
        return Ok(deferred);
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
        return Ok(0);
    }
    let mut plans = Vec::new();
    let mut facts: HashMap<String, (CallFacts, String)> = HashMap::new();
    let mut unassigned = Vec::new();
    let mut script_failed = Vec::new();
    // `rules.lines.skip_offline_operator`: an operator whose line is offline gets no task.
    let offline_lines: HashSet<String> = if cfg.rules.lines.skip_offline_operator {
        ctx.store
            .lock()
            .lines()?
            .into_iter()
            .filter(|l| {
                l.status
                    .as_deref()
                    .is_some_and(|s| cfg.rules.lines.is_offline(s))
            })
            .map(|l| l.line)
            .collect()
    } else {
        HashSet::new()
    };
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
        let crm = ledger_entity
            .as_ref()
            .and_then(|e| by_entity.get(&(e.kind.clone(), e.id)).copied())
            .or_else(|| by_number.get(&d.facts.client_number).map(|(_, r)| *r));
        let operator = d
            .facts
            .operator_line
            .as_ref()
            .filter(|line| !offline_lines.contains(*line))
            .and_then(|line| users.get(line).copied());
        let responsible = cfg.rules.responsible.pick(
            &d.facts,
            crm,
            operator,
            cfg.bitrix24.default_user_id.map(|u| u as i64),
        );
        let Some(responsible) = responsible else {
            unassigned.push(d);
            continue;
        };
        let mut l = l.clone();
        l.responsible_id = Some(responsible);
        l.client = Some(d.facts.client_number.clone());
        l.task_comment = false;
        // The entity the task is bound to (a later folded description names the same card).
        if let (None, Some(e)) = (&l.crm_entity_type, &entity) {
            l.crm_entity_type = Some(e.kind.clone());
            l.crm_entity_id = Some(e.id);
        }
        let command = plan::task_add(
            cfg,
            &d.facts,
            responsible,
            entity.as_ref(),
            operator_name(&d.facts),
        );
        let commands = match scripted(&ctx.cfg, &d.facts, &d.item.raw, vec![command]) {
            Ok(c) => c,
            Err(e) => {
                script_failed.push((d, e));
                continue;
            }
        };
        facts.insert(
            d.facts.id.clone(),
            (d.facts.clone(), d.item.content_hash.clone()),
        );
        // Tasks are not idempotent: each is marked in flight with its responsible user first
        // (its own flag, not the call's stage), so a pass that dies before recording finds it
        // again instead of adding a second one.
        l.task_in_flight_since = Some(now);
        plans.push(Chain {
            plan: CallPlan {
                call_id: d.facts.id.clone(),
                commands,
            },
            row: l,
            non_idempotent: false,
        });
    }
    settle_unassigned(ctx, opts, s, unassigned, now)?;
    settle_script_errors(ctx, opts, s, script_failed, now)?;
    if opts.dry_run {
        s.plan
            .extend(plans.iter().flat_map(|c| describe_plan(&c.plan)));
        return Ok(deferred);
    }
    let mut tasks = 0;
    send_plans(
        ctx,
        plans,
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
    Ok(deferred)
}

/// What becomes of each missed call due a task.
struct Decided {
    /// Tasks of their own.
    own: Vec<Due>,
    /// Folded into the client's open task.
    followups: Vec<(Due, ClientTask)>,
    /// Waiting for the task another call of their client is getting.
    deferred: usize,
}

/// Decides, call by call (oldest first): with `tasks.one_per_client`, one action per client per
/// round — folded into the client's open task, or a new task while no other is being created
/// for them. (A client already reached after the call still gets the task, completed at once
/// by `close_reached`: the CRM shows the missed call and who called back.)
fn decide(
    ctx: &SyncCtx,
    opts: &PassOptions,
    s: &mut PassSummary,
    due: Vec<Due>,
) -> Result<Decided, SyncError> {
    let cfg = &ctx.cfg;
    let mut out = Decided {
        own: Vec::new(),
        followups: Vec::new(),
        deferred: 0,
    };
    let mut clients = HashSet::new();
    {
        let store = ctx.store.lock();
        for d in due {
            let client = d.facts.client_number.clone();
            if cfg.tasks.one_per_client {
                if !clients.insert(client.clone())
                    || store.task_in_flight_for(&client, &d.item.ledger.call_id)?
                {
                    out.deferred += 1;
                    if opts.dry_run {
                        s.plan.push(format!(
                            "call {}: added to the task of {client}'s earlier missed call (tasks.one_per_client)",
                            d.facts.id
                        ));
                    }
                    continue;
                }
                // (`task_comment` without a task: the open task refused this call.) A task
                // whose client was reached after its last missed call and before this one is
                // done for this call's purposes (completed by `close_reached` this pass), as it
                // would have been had the passes run as the calls came: this call opens another.
                if !d.item.ledger.task_comment {
                    if let Some(t) = store.open_task_for(&client)? {
                        if !store.reached_between(&client, t.last_missed(), d.item.started_at)? {
                            out.followups.push((d, t));
                            continue;
                        }
                    }
                }
            }
            out.own.push(d);
        }
    }
    Ok(out)
}
